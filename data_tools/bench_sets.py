"""Writers shared by the real-image benchmarks (make_icon_bench, make_glyph_bench).

Training images go through make_shards (the project's own route from a table to shards); held-out sets are
written in CLIP_benchmark's webdataset layout (classnames, templates, dataset_type, test/N.tar, nshards.txt),
read by `eval_zeroshot.py` and `clip_benchmark` alike. Images arrive rendered (PNG bytes).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from data_tools.make_demo_data import eval_split_dir, finish_split
from data_tools.make_shards import make_shards
from vlp.data.tario import ShardWriter


def write_train(rows: list[dict], output: Path, per_shard: int, progress: bool) -> dict:
    """Training shards from rows of {'png': bytes, 'caption': str, ...} (other keys go to each `.json`)."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        table = []
        for n, row in enumerate(rows):
            path = Path(tmp) / f"{n:06d}.png"
            path.write_bytes(row["png"])
            table.append({"image": path.name, **{k: v for k, v in row.items() if k != "png"}})
        (Path(tmp) / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
        return make_shards(str(Path(tmp) / "train.jsonl"), str(output), per_shard=per_shard, progress=progress)


def write_classification(root: Path, classnames: list[str], samples: list[tuple[bytes, int]], templates: list[str],
                         per_shard: int = 1000) -> int:
    """A zero-shot classification set of (PNG, class index) samples; -> its size."""
    split_dir = eval_split_dir(root, classnames, templates, "zeroshot_classification")
    with ShardWriter(str(split_dir / "%d.tar"), per_shard) as sink:
        for n, (png, cls) in enumerate(samples):
            sink.write(f"s{n:07d}", {"png": png, "cls": str(cls).encode()})
    finish_split(split_dir)
    return len(samples)


def write_retrieval(root: Path, samples: list[tuple[bytes, list[str]]], per_shard: int = 1000) -> int:
    """A retrieval set of (PNG, captions) samples (newline-separated `txt`, CLIP_benchmark's layout)."""
    split_dir = eval_split_dir(root, None, None, "retrieval")
    with ShardWriter(str(split_dir / "%d.tar"), per_shard) as sink:
        for n, (png, caps) in enumerate(samples):
            sink.write(f"s{n:07d}", {"png": png, "txt": "\n".join(caps).encode()})
    finish_split(split_dir)
    return len(samples)
