"""Results in CLIP_benchmark's JSON schema, written all-or-nothing; a summary table; metric-vs-step plots.

A result is `{"dataset", "model", "pretrained", "task", "metrics", "language"}` exactly as CLIP_benchmark's
CLI dumps it (so `clip_benchmark build` reads vlp's files); vlp adds `"vlp"` (step, checkpoint, sizes,
seconds) and, on request, `"per_class"`. Metric names are CLIP_benchmark's; vlp's extra figures are the
`*_mean_rank` / `*_median_rank` retrieval keys and the `geometry/*` keys.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from vlp.eval.evalset import EvalError

MAIN_METRICS = {
    "zeroshot_classification": ["acc1", "acc5", "mean_per_class_recall"],
    "zeroshot_retrieval": ["image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                           "text_retrieval_recall@5"],
    "linear_probe": ["lp_acc1", "lp_acc5", "lp_mean_per_class_recall"],
    "knn": ["knn_acc1@1", "knn_acc1@10", "knn_acc1@20"],
    "image_caption_selection": ["acc"],
}
TASK_SHORT = {"zeroshot_classification": "zs-cls", "zeroshot_retrieval": "retrieval", "linear_probe": "lp",
              "knn": "knn", "image_caption_selection": "hard-neg"}
SHORT = {"image_retrieval_recall@1": "t2i@1", "image_retrieval_recall@5": "t2i@5",
         "text_retrieval_recall@1": "i2t@1", "text_retrieval_recall@5": "i2t@5",
         "mean_per_class_recall": "mpcr", "geometry/modality_gap": "gap", "geometry/mean_paired_cosine": "pair_cos"}


def make_result(dataset: str, task: str, metrics: dict, *, model: str = "", pretrained: str = "",
                language: str = "en", **extra) -> dict:
    out = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
           "language": language}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _slug(s: str) -> str:
    """A name part safe in a file name anywhere: no '/', no ':' (`local-dir:EXPORT`, Windows drive letters)."""
    return str(s).replace("/", "_").replace(os.sep, "_").replace(":", "_") or "none"


DEFAULT_NAME = "{dataset}_{pretrained}_{model}_{language}_{task}.json"     # CLIP_benchmark's --output default


def result_filename(r: dict, template: str = DEFAULT_NAME) -> str:
    """A result's file name from CLIP_benchmark's `--output` template (its keys: dataset, pretrained, model,
    language, task); the pretrained slug is the checkpoint's file name (a run folder's checkpoints differ by
    their step)."""
    pre = r.get("pretrained") or "none"
    pre = os.path.basename(pre) if os.path.sep in pre or os.path.isfile(pre) else pre
    model = Path(r["model"]).stem if r["model"].endswith(".json") else r["model"]
    try:
        return template.format(dataset=_slug(r["dataset"]), pretrained=_slug(pre), model=_slug(model),
                               language=r["language"], task=r["task"])
    except (KeyError, IndexError, ValueError) as e:
        raise EvalError(f"--output template {template!r}: {e!r} is not one of dataset, pretrained, model, "
                        "language, task") from None


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o))


def write_results(results: list[dict], out_dir: str | os.PathLike, plot: bool = False,
                  extra: Optional[dict[str, str]] = None, loss_curve: Optional[list[tuple[int, float]]] = None,
                  name_template: Optional[str] = None, eval_rows: Optional[list] = None) -> list[Path]:
    """Write every result (and the plot, and `extra` {file name: text}, e.g. a suite's table) to a temporary
    folder first, then move them in: an error before the end leaves nothing behind, and no file is ever
    half-written. `name_template`: CLIP_benchmark's `--output` file template (default its default)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".vlp-eval-", dir=out))
    except OSError as e:
        raise EvalError(f"cannot write results to {out}: {e.strerror or e}") from None
    written: list[Path] = []
    try:
        names = {}
        for r in results:
            name = result_filename(r, name_template or DEFAULT_NAME)
            if name in names:
                raise EvalError(f"two results would be written to {name}" +
                                (f": add {{dataset}}, {{task}} or {{pretrained}} to --output" if name_template else ""))
            names[name] = r
            # NaN (acc5 with < 5 classes) is written as CLIP_benchmark's json.dump writes it
            (tmp / name).write_text(json.dumps(r, default=_json_default))
        if plot:
            plot_metrics_vs_step(results, tmp / "metrics_vs_step.png", loss_curve=loss_curve, eval_rows=eval_rows)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def summary_table(results: Iterable[dict]) -> str:
    """A plain-text table: one row per result, the main metrics of its task plus the modality gap."""
    results = list(results)
    if not results:
        return "(no results)"
    cols = ["checkpoint", "dataset", "task"]
    metric_cols: list[str] = []
    for r in results:
        for k in MAIN_METRICS.get(r["task"], []) + ["geometry/modality_gap", "geometry/mean_paired_cosine"]:
            if k in r["metrics"] and k not in metric_cols:
                metric_cols.append(k)
    rows = []
    for r in results:
        at = progress(r)
        ck = f"{at[0]} {at[1]}" if at else (os.path.basename(r.get("pretrained") or "") or r.get("model", ""))
        task = TASK_SHORT.get(r["task"], r["task"])
        rows.append([ck, r["dataset"], task] + [_fmt(r["metrics"].get(k)) for k in metric_cols])
    header = cols + [SHORT.get(k, k) for k in metric_cols]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def progress(result: dict) -> Optional[tuple[str, int]]:
    """("step", n) for a vlp checkpoint's result, ("epoch", n) for an open_clip_train run's, else None."""
    info = result.get("vlp", {})
    for unit in ("step", "epoch"):
        if info.get(unit) is not None:
            return unit, int(info[unit])
    return None


def plot_metrics_vs_step(results: list[dict], path: str | os.PathLike,
                         loss_curve: Optional[list[tuple[int, float]]] = None,
                         eval_rows: Optional[list] = None) -> Optional[Path]:
    """The run-folder plot (vlp.eval.plot): loss curve, headline metrics with chance level, then the rest."""
    from vlp.eval.plot import plot_run

    return plot_run(results, path, loss_curve=loss_curve, progress=progress, eval_rows=eval_rows)
