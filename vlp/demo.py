"""The built-in demo: procedural shapes data -> a tiny CLIP trained on CPU -> zero-shot and retrieval figures.

    python -m vlp.demo [--output demo_out] [--no-rewrites] [-- extra train.py flags]

It writes the demo data once (`OUT/data`), trains with `configs/demo.yaml` (a few minutes on
2 CPU cores) and evaluates on the held-out eval sets at the end; the run folder is `OUT/runs/NAME`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlp.flags import Parser

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
CHANCE = {"demo_colors": 1 / 8, "demo_shapes": 1 / 5}
LAYOUT = 2          # demo data written before this layout (no demo_compositional set) is written again


def ensure_data(out: Path, train_samples: int) -> dict:
    """Generate the demo data unless a complete copy with the same size is already there."""
    from data_tools.make_demo_data import make_demo_data

    marker = out / "paths.json"
    if marker.is_file():
        paths = json.loads(marker.read_text())
        if paths.get("train_samples") == train_samples and paths.get("layout") == LAYOUT:
            print(f"demo data: {out} (written before: {train_samples} training samples, 4 eval sets)",
                  file=sys.stderr, flush=True)
            return paths
    t0 = time.time()
    print(f"demo data: writing {train_samples} training samples (64 px shapes with captions and rewrites) and 4 "
          f"held-out eval sets (colours, shapes, retrieval, compositional) to {out}", file=sys.stderr, flush=True)
    paths = make_demo_data(out, train_samples=train_samples)
    print(f"demo data: written in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    paths["train_samples"], paths["layout"] = train_samples, LAYOUT
    marker.write_text(json.dumps(paths, indent=1))
    return paths


SHOWN = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
         "text_retrieval_recall@1", "text_retrieval_recall@5", "geometry/modality_gap", "geometry/mean_paired_cosine",
         "acc", "acc/swap_att", "acc/swap_obj", "acc/replace_att", "acc/replace_obj", "acc/replace_rel")


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """(dataset, metric, value) rows of the final evaluation for the printed table."""
    rows = []
    for key, value in sorted(result.items()):
        if not key.startswith("eval/"):
            continue
        for metric in SHOWN:
            if key.endswith("/" + metric):
                dataset = key[len("eval/"):-len(metric) - 1]
                rows.append((dataset, metric, f"{value:.3f}"))
                short = dataset.rsplit("/", 1)[-1]
                if metric == "acc1" and short in CHANCE:
                    rows.append((dataset, "acc1 at chance", f"{CHANCE[short]:.3f}"))
                if metric == "acc":
                    rows.append((dataset, "acc at chance (caption vs one negative)", "0.500"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = Parser(description="Train and evaluate vlp's demo model on procedural shapes (CPU).")
    p.add_argument("--output", "--out", dest="out", default="demo_out", help="folder for data and runs")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--name", default=None, help="run name (default: demo or demo-rewrites, timestamped)")
    p.add_argument("--rewrites", action=argparse.BooleanOptionalAction, default=True,
                   help="draw each sample's text from its caption and rewrites (LaCLIP); --no-rewrites: captions only")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]

    from vlp.config import ConfigError, build_parser, parse_config
    from vlp.data.errors import DataError
    from vlp.flags import check
    from vlp.train.loop import TrainingError, train

    try:
        check(build_parser(), extra, ConfigError)   # a bad training flag answered before any data is made
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    t0 = time.time()
    paths = ensure_data(out / "data", args.train_samples)
    name = args.name or f"demo{'-rewrites' if args.rewrites else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    flags = ["--config", str(DEMO_CONFIG), "--train-data", paths["train_data"],
             "--train-num-samples", str(args.train_samples), "--logs", str(out / "runs"), "--name", name,
             "--eval-data", *paths["eval_data"]]
    if args.rewrites:
        flags.append("--use-rewrites")
    try:
        cfg = parse_config(flags + extra)
        result = train(cfg, show_final_eval=False)   # printed once, below, with the chance levels
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = summary_rows(result)
    print(f"\nvlp demo ({'with' if args.rewrites else 'without'} rewrites), {time.time() - t0:.0f} s in all; "
          f"run folder {result['run_dir']}")
    width = max([len("metric")] + [len(m) for _, m, _ in rows])
    print(f"{'dataset':<20} {'metric':<{width}} value")
    for dataset, metric, value in rows:
        print(f"{dataset:<20} {metric:<{width}} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
