"""The run-folder plot: training loss, then the headline metrics against their chance level, then the rest.

Points come from the scored checkpoints and, for a vlp run, from the in-loop evaluations in RUN/metrics.jsonl
(every `--eval-every` steps, not only the few checkpoints kept); every panel shares the step axis, and a
panel with fewer than two points (nothing to follow) is left out.
Panels in reading order: the training loss curve (from RUN/metrics.jsonl, when given), the headline metrics
(acc1, acc5, mean per-class recall, R@1/R@5 both ways), other figures (ranks, probes, ...), embedding
geometry last. Accuracies and recalls are drawn on their full 0-1 scale with chance as a dashed line, so a
0.002 wiggle looks like one; other panels include 0 in their range when their values share a sign.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

HEADLINE = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
            "text_retrieval_recall@1", "text_retrieval_recall@5", "lp_acc1", "image_caption_selection_accuracy")
TITLES = {"image_retrieval_recall@1": "text→image R@1", "image_retrieval_recall@5": "text→image R@5",
          "text_retrieval_recall@1": "image→text R@1", "text_retrieval_recall@5": "image→text R@5",
          "mean_per_class_recall": "mean per-class recall"}
UNIT_SCALE = ("acc", "recall", "accuracy")   # metric names whose values live in [0, 1]


def chance(metric: str, info: dict) -> Optional[float]:
    """Chance level of a headline metric given the set's sizes (`result["vlp"]`), or None if unknown."""
    classes, images = info.get("n_classes"), info.get("n_images")
    if classes and metric in ("acc1", "mean_per_class_recall", "lp_acc1"):
        return 1 / classes
    if classes and metric == "acc5":
        return min(5, classes) / classes
    if images and "retrieval_recall@" in metric:
        return min(1.0, int(metric.rsplit("@", 1)[1]) / images)   # k of N images (≈ the same for captions)
    if metric == "image_caption_selection_accuracy":
        return 0.5
    return None


def _rows(run_dir: str | os.PathLike):
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                yield row


def read_loss_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, train/loss) from a run folder's metrics.jsonl (the last row of a step wins: resumed runs)."""
    curve = {row["step"]: float(row["train/loss"]) for row in _rows(run_dir)
             if isinstance(row.get("train/loss"), (int, float))}
    return sorted(curve.items())


def read_eval_rows(run_dir: str | os.PathLike) -> list[tuple[int, dict]]:
    """(step, {"eval/<dataset>/<metric>": value}) of each in-loop evaluation in a run folder's metrics.jsonl."""
    out = {}
    for row in _rows(run_dir):
        ev = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        if ev:
            out.setdefault(row["step"], {}).update(ev)
    return sorted(out.items())


def _order(key: str) -> tuple:
    if key in HEADLINE:
        return (0, HEADLINE.index(key), key)
    return (2 if key.startswith("geometry/") else 1, 0, key)


def plot_run(results: list[dict], path: str | os.PathLike, loss_curve: Optional[list[tuple[int, float]]] = None,
             progress=None, eval_rows: Optional[list[tuple[int, dict]]] = None) -> Optional[Path]:
    """Write the plot; None when there is nothing to draw. `progress(result) -> (unit, n) | None` places a
    result on the x axis (a checkpoint's step or epoch); `eval_rows` (`read_eval_rows`) add in-loop points."""
    fig = draw(results, loss_curve, progress, eval_rows)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _in_loop_points(eval_rows, datasets: set[str]):
    """(metric, dataset, step, value) of in-loop evaluations of the scored datasets (a dataset name may hold '/')."""
    by_length = sorted(datasets, key=len, reverse=True)
    for step, row in eval_rows or []:
        for key, v in row.items():
            rest = key[len("eval/"):]
            d = next((d for d in by_length if rest.startswith(d + "/")), None)
            if d is not None:
                yield rest[len(d) + 1:], d, int(step), float(v)


def draw(results: list[dict], loss_curve: Optional[list[tuple[int, float]]] = None, progress=None,
         eval_rows: Optional[list[tuple[int, dict]]] = None):
    """The figure plot_run saves (None if empty); its axes are in panel order."""
    points: dict[str, dict[str, dict[int, float]]] = {}
    chances: dict[tuple[str, str], float] = {}
    unit = "step"
    for r in results:
        at = progress(r) if progress else None
        if at is None:
            continue
        unit, step = at
        for k, v in r["metrics"].items():
            if isinstance(v, (int, float)) and not math.isnan(v):
                points.setdefault(k, {}).setdefault(r["dataset"], {})[int(step)] = float(v)
                c = chance(k, r.get("vlp", {}))
                if c is not None:
                    chances[(k, r["dataset"])] = c
    if unit == "step":
        for k, d, step, v in _in_loop_points(eval_rows, {r["dataset"] for r in results}):
            if not math.isnan(v):
                points.setdefault(k, {}).setdefault(d, {}).setdefault(step, v)     # a scored checkpoint wins
    series = {k: {d: sorted(p.items()) for d, p in by_ds.items()} for k, by_ds in points.items()
              if max(len(p) for p in by_ds.values()) >= 2}                     # one point: nothing to follow
    panels = (["train/loss"] if loss_curve and len(loss_curve) >= 2 else []) + sorted(series, key=_order)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = 4
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 2.8 * nrow), squeeze=False, sharex=True)
    colours = {ds: f"C{i}" for i, ds in enumerate(sorted({ds for s in series.values() for ds in s}))}
    for ax, key in zip(axes.flat, panels):
        if key == "train/loss":
            ax.plot([s for s, _ in loss_curve], [v for _, v in loss_curve], lw=1, color="k")
            ax.set_title("training loss", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        else:
            for ds, pts in sorted(series[key].items()):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=ds, color=colours[ds])
                if (key, ds) in chances:
                    ax.axhline(chances[(key, ds)], ls="--", lw=0.8, color=colours[ds], alpha=0.7)
            ax.set_title(TITLES.get(key, key) + (" (dashed: chance)" if any(k == key for k, _ in chances) else ""),
                         fontsize=9)
            ax.set_xlabel(unit, fontsize=8)
            values = [v for pts in series[key].values() for _, v in pts]
            if any(w in key for w in UNIT_SCALE) and not key.endswith("rank") and 0 <= min(values) and max(values) <= 1:
                ax.set_ylim(0, 1.02)
            elif min(values) >= 0:
                ax.set_ylim(bottom=0)
            elif max(values) <= 0:
                ax.set_ylim(top=0)
            if len(colours) > 1:
                ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
