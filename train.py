#!/usr/bin/env python
"""Train a CLIP-style dual encoder on webdataset shards (flags as in open_clip; see --help).

    python train.py --train-data 'shards/{00000..00099}.tar' --model ViT-B-32 --batch-size 256 --epochs 10
    accelerate launch --num_processes 2 train.py ...      # or: torchrun --nproc_per_node 2 train.py ...
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from vlp.config import ConfigError, parse_config
    from vlp.data.errors import DataError
    from vlp.train.loop import TrainingError, train

    try:
        cfg = parse_config(argv)
        result = train(cfg)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # one summary, not one per process
        print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
