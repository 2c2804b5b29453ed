"""Write the built-in demo data: training shards (img2dataset layout) and eval sets (CLIP_benchmark layout).

    vlp data make-demo-data --out demo_data --train-samples 20000

Training shards hold `{key}.jpg`, `{key}.txt` (a terse caption) and `{key}.json`
(`caption`, `rewrites`: other phrasings of the same scene, `objects`), plus `sizes.json`.
Eval sets follow CLIP_benchmark's webdataset layout:
`ROOT/test/{0..n-1}.tar`, `ROOT/test/nshards.txt`, `ROOT/classnames.txt`,
`ROOT/zeroshot_classification_templates.txt`, `ROOT/dataset_type.txt`.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path

from vlp.data import demo_world as W
from vlp.data.tario import ShardWriter
from vlp.flags import Parser
from vlp.progress import progress_bar


def _shards(out_dir: Path, pattern: str, maxcount: int) -> ShardWriter:
    out_dir.mkdir(parents=True, exist_ok=True)
    return ShardWriter(str(out_dir / pattern), maxcount)


def write_train(out: Path, n: int, image_size: int, per_shard: int, seed: int, progress: bool = True) -> None:
    rng = random.Random(seed)
    with _shards(out, "%05d.tar", per_shard) as sink:
        for i in progress_bar(range(n), desc="train shards", disable=not progress, unit="img"):
            things = W.random_scene(rng)
            captions = W.phrasings(things, rng)
            key = f"{i:09d}"
            sink.write(key, {
                "jpg": W.encode_jpeg(W.render(things, image_size, rng)),
                "txt": captions[0].encode(),
                "json": json.dumps({"key": key, "caption": captions[0], "rewrites": captions[1:],
                                    "objects": [asdict(t) for t in things]}).encode(),
            })
    (out / "sizes.json").write_text(json.dumps(sink.sizes, indent=1))


def eval_split_dir(root: Path, classnames: list[str] | None, templates: list[str] | None, dataset_type: str) -> Path:
    """Write ROOT's class names, templates and dataset type (CLIP_benchmark wds layout); -> ROOT/test."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    (root / "dataset_type.txt").write_text(dataset_type + "\n")
    return root / "test"


def finish_split(split_dir: Path) -> None:
    """Record the split's shard count (nshards.txt), as CLIP_benchmark reads it."""
    n = len(list(split_dir.glob("*.tar")))
    (split_dir / "nshards.txt").write_text(f"{n}\n")


def write_classification(root: Path, attribute: str, n: int, image_size: int, seed: int, per_shard: int) -> None:
    """Single-shape scenes, balanced over the classes of `attribute` ('color' or 'shape')."""
    rng = random.Random(seed)
    classes = list(W.COLORS) if attribute == "color" else list(W.SHAPES)
    templates = W.COLOR_TEMPLATES if attribute == "color" else W.SHAPE_TEMPLATES
    split = eval_split_dir(root, classes, [t.replace("{c}", "{c}") for t in templates], "zeroshot_classification")
    with _shards(split, "%d.tar", per_shard) as sink:
        for i in range(n):
            cls = i % len(classes)
            t = W.Thing(
                color=classes[cls] if attribute == "color" else rng.choice(list(W.COLORS)),
                shape=classes[cls] if attribute == "shape" else rng.choice(W.SHAPES),
                size=rng.choice(list(W.SIZES)), position=rng.choice(list(W.POSITIONS)))
            sink.write(f"s{i:07d}", {"png": W.encode_png(W.render([t], image_size, rng)), "cls": str(cls).encode()})
    finish_split(split)


def write_retrieval(root: Path, n: int, image_size: int, seed: int, per_shard: int) -> None:
    """Scenes with several captions each (CLIP_benchmark retrieval layout: newline-separated `txt`)."""
    rng = random.Random(seed)
    split = eval_split_dir(root, None, None, "retrieval")
    with _shards(split, "%d.tar", per_shard) as sink:
        for i in range(n):
            things = W.random_scene(rng)
            captions = W.phrasings(things, rng)[1:4]
            sink.write(f"s{i:07d}", {"png": W.encode_png(W.render(things, image_size, rng)),
                                     "txt": "\n".join(captions).encode()})
    finish_split(split)


def write_compositional(root: Path, n: int, image_size: int, seed: int) -> None:
    """Two-shape scenes with SugarCrepe-style hard negatives (`demo_world.hard_negatives`): `ROOT/images/*.png`
    and one `ROOT/{subset}.json` per subset in SugarCrepe's layout {id: {filename, caption, negative_caption}}."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    subsets: dict[str, dict] = {}
    for i in range(n):
        things = W.random_scene(rng, two_prob=1.0)
        name = f"images/{i:06d}.png"
        (root / name).write_bytes(W.encode_png(W.render(things, image_size, rng)))
        caption, negatives = W.hard_negatives(things, rng)
        for subset, neg in negatives.items():
            subsets.setdefault(subset, {})[str(i)] = {"filename": name, "caption": caption, "negative_caption": neg}
    for subset, rows in sorted(subsets.items()):
        (root / f"{subset}.json").write_text(json.dumps(rows, indent=0))


def make_demo_data(out: str | Path, train_samples: int = 20000, eval_samples: int = 800, image_size: int = 64,
                   per_shard: int = 1000, seed: int = 0, progress: bool = True) -> dict[str, str]:
    """Write everything; returns the paths a run needs (train shard spec and eval roots)."""
    out = Path(out)
    write_train(out / "train", train_samples, image_size, per_shard, seed, progress)
    write_classification(out / "eval" / "demo_colors", "color", eval_samples, image_size, seed + 1, per_shard)
    write_classification(out / "eval" / "demo_shapes", "shape", eval_samples, image_size, seed + 2, per_shard)
    write_retrieval(out / "eval" / "demo_retrieval", eval_samples // 2, image_size, seed + 3, per_shard)
    write_compositional(out / "eval" / "demo_compositional", eval_samples // 4, image_size, seed + 4)
    n_shards = (train_samples + per_shard - 1) // per_shard
    return {
        "train_data": str(out / "train" / f"{{00000..{n_shards - 1:05d}}}.tar"),
        "eval_data": [str(out / "eval" / d) for d in ("demo_colors", "demo_shapes", "demo_retrieval",
                                                                  "demo_compositional")],
    }


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--output", "--out", dest="out", required=True, help="output folder")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--eval-samples", type=int, default=800)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = make_demo_data(a.out, a.train_samples, a.eval_samples, a.image_size, a.per_shard, a.seed)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
