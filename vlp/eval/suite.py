"""Evaluation suites: one YAML file naming many sets (with tasks and weights) and one aggregate table.

    # suite.yaml                                 (a plain list works too, without `datasets:`)
    datasets:
      - dataset: wds/cifar10                     # CLIP_benchmark's --dataset ...
        root: /data/wds_cifar10                  # ... and --dataset_root
        task: zeroshot_classification            # its --task (default: from the set's layout)
      - dataset: wds/cifar10
        root: /data/wds_cifar10
        task: linear_probe
        fewshot_k: 10                            # spec options: split, classnames, templates, train_split, ...
      - path: demo/eval/demo_retrieval           # any vlp spec (a path, optionally with ?key=value)
        weight: 2                                # weight in the mean (default 1)
      - path: sugar_crepe/                       # SugarCrepe JSONs; images under root
        root: /data/coco/val2017
        name: sugar_crepe
        metric: acc/swap                         # the metric that enters the table (default: per task)

Relative paths are resolved against the suite file's folder. A `dataset:` entry's name is that
CLIP_benchmark name, so the per-set JSON files are named as CLIP_benchmark names them. Each set gives
one score per checkpoint (`MAIN_METRIC` of its task unless `metric:` says otherwise); the table has
one row per checkpoint, one column per set and the weighted mean over sets.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

from vlp.eval.datasets import SPEC_KEYS, TASKS, EvalError, parse_spec

MAIN_METRIC = {"zeroshot_classification": "acc1", "zeroshot_retrieval": "mean_recall@1",
               "linear_probe": "lp_acc1", "knn": "knn_acc1@20", "image_caption_selection": "acc"}
ENTRY_KEYS = {"path", "dataset", "weight", "metric"} | SPEC_KEYS


@dataclass
class SuiteEntry:
    spec: str
    weight: float = 1.0
    metric: Optional[str] = None
    dataset: Optional[str] = None      # CLIP_benchmark's dataset name, for `wds/...` entries
    root: Optional[str] = None
    task: Optional[str] = None


def is_suite(arg: str) -> bool:
    return arg.lower().endswith((".yaml", ".yml"))


def load_suite(path: str) -> list[SuiteEntry]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"suite file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise EvalError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        data = data.get("datasets")
    if not isinstance(data, list) or not data:
        raise EvalError(f"{p}: a suite is a list of sets (or `datasets:` holding one)")
    return [_entry(p, i, e) for i, e in enumerate(data, start=1)]


def _entry(suite: Path, i: int, e) -> SuiteEntry:
    where = f"{suite}: set {i}"
    if isinstance(e, str):
        e = {"path": e}
    if not isinstance(e, dict):
        raise EvalError(f"{where}: expected a mapping with `path` or `dataset`")
    unknown = set(e) - ENTRY_KEYS
    if unknown:
        raise EvalError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(ENTRY_KEYS)})")
    if ("path" in e) == ("dataset" in e and "root" in e):
        raise EvalError(f"{where}: give either `path` or `dataset` + `root`")
    if e.get("task") is not None and e["task"] not in TASKS:
        raise EvalError(f"{where}: task must be one of {TASKS}")
    try:
        weight = float(e.get("weight", 1.0))
    except (TypeError, ValueError):
        weight = float("nan")
    if not math.isfinite(weight) or weight < 0:
        raise EvalError(f"{where}: weight must be a finite number >= 0")
    base, query = str(e["path"] if "path" in e else e["root"]), {}
    if "?" in base:
        base, _, q = base.partition("?")
        query = parse_spec("x?" + q)[1]
    path = Path(base).expanduser()
    if not path.is_absolute():
        path = suite.parent / path
    opts = {k: str(v) for k, v in e.items() if k in SPEC_KEYS and v is not None}
    if "dataset" in e:
        opts.setdefault("name", str(e["dataset"]))
    for k in ("root", "classnames", "templates", "train"):
        if k in opts and opts[k] not in ("imagenet", "folders", "openai", "simple") and not Path(opts[k]).is_absolute():
            opts[k] = str(suite.parent / opts[k])
    query.update(opts)
    spec = str(path) + ("?" + urlencode(query) if query else "")
    return SuiteEntry(spec, weight, e.get("metric"), e.get("dataset"), str(path), e.get("task"))


def score(result: dict, metric: Optional[str] = None) -> float:
    """The one figure of a result that enters the suite table."""
    m = result["metrics"]
    key = metric or MAIN_METRIC.get(result["task"], "")
    if key == "mean_recall@1" and key not in m:
        return (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2
    if key not in m:
        raise EvalError(f"{result['dataset']}: no metric '{key}' in its {result['task']} result")
    return float(m[key])


def _checkpoint(r: dict) -> str:
    from vlp.eval.report import progress

    at = progress(r)
    return f"{at[0]} {at[1]}" if at else (r.get("pretrained") or r.get("model") or "")


def aggregate(results: list[dict], entries: list[SuiteEntry], names: list[tuple[str, str]]) -> dict:
    """{"columns", "weights", "rows": [{"checkpoint", "scores": {column: v}, "mean"}]}; `names[i]` is the
    (dataset, task) that `entries[i]` produced."""
    cols = [f"{d} ({t})" if sum(n[0] == d for n in names) > 1 else d for d, t in names]
    rows: dict[str, dict] = {}
    for r in results:
        for col, (d, t), e in zip(cols, names, entries):
            if r["dataset"] == d and r["task"] == t:
                row = rows.setdefault(_checkpoint(r), {"checkpoint": _checkpoint(r), "scores": {}})
                row["scores"][col] = score(r, e.metric)
    weights = {c: e.weight for c, e in zip(cols, entries)}
    for row in rows.values():
        got = [(row["scores"][c], weights[c]) for c in cols if c in row["scores"]]
        total = sum(w for _, w in got)
        row["mean"] = sum(v * w for v, w in got) / total if total > 0 else float("nan")
    return {"columns": cols, "weights": weights,
            "metrics": {c: e.metric or MAIN_METRIC.get(t, "") for c, e, (_, t) in zip(cols, entries, names)},
            "rows": list(rows.values())}


def table_files(agg: dict) -> dict[str, str]:
    """suite.csv, suite.md and suite.json contents of an aggregate."""
    cols = agg["columns"]
    header = ["checkpoint"] + cols + ["mean"]
    lines = [[r["checkpoint"]] + [r["scores"].get(c) for c in cols] + [r["mean"]] for r in agg["rows"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([[("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for v in row] for row in lines])
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else \
        (f"{v:.4f}" if isinstance(v, float) else str(v))
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in lines]
    md.append("")
    md.append("mean: weighted over sets (weights " + ", ".join(f"{c} {agg['weights'][c]:g}" for c in cols) + "); "
              "metric per set: " + ", ".join(f"{c} {agg['metrics'][c]}" for c in cols))
    return {"suite.csv": buf.getvalue(), "suite.md": "\n".join(md) + "\n",
            "suite.json": json.dumps(agg, indent=1, default=lambda o: None)}
