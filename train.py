#!/usr/bin/env python
"""Train a CLIP-style dual encoder on webdataset shards (flags as in open_clip; see --help).

    python train.py --train-data 'shards/{00000..00099}.tar' --model ViT-B-32 --batch-size 256 --epochs 10
    accelerate launch --num_processes 2 train.py ...      # or: torchrun --nproc_per_node 2 train.py ...

Exit codes: 0 done; 2 an error to fix (one line on stderr); 75 stopped by SIGTERM/SIGINT/SIGUSR1 after
saving a checkpoint (run the same command with `--resume latest` to continue).
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from vlp.thread_env import check_omp_env

    check_omp_env()   # before torch is imported (libgomp reads OMP_NUM_THREADS then)
    from vlp.config import ConfigError, parse_config
    from vlp.data.errors import DataError
    from vlp.runtime.preemption import EXIT_PREEMPTED, Preempted, ignore_stop_signals

    try:
        cfg = parse_config(argv)  # before torch is imported, so --help and a bad flag answer at once
        from vlp.train.loop import train

        result = train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _training_error() as e:  # evaluated only when an exception gets here
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM/SIGINT/SIGUSR1: the state is saved; the same command + --resume latest goes on
        ignore_stop_signals()
        if os.environ.get("RANK", "0") == "0":
            print(f"{getattr(e, 'label', 'preempted')}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    if os.environ.get("RANK", "0") == "0":  # one summary, not one per process
        print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def _training_error() -> type | tuple:
    """vlp's TrainingError if the loop was imported (only then can one have been raised), else nothing to catch."""
    health = sys.modules.get("vlp.train.health")
    return health.TrainingError if health else ()


if __name__ == "__main__":
    sys.exit(main())
