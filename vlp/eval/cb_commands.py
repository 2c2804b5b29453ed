"""The `clip_benchmark eval` command that scores each of vlp's eval sets the way vlp scores it
(`vlp eval --clip-benchmark-commands`), for sets named any way vlp takes them: `--data PATH`, CLIP_benchmark's
`--dataset wds/NAME --dataset_root ROOT`, or a suite file.

Each command runs as printed: `--num_workers` no larger than the set's shard count (CLIP_benchmark's default 4
on a one-shard set ends in "No samples found in dataset; perhaps you have fewer shards than workers"), an
`--output` of its own (the file name vlp gives the same result, so the two compare file by file and sets do not
overwrite each other; CLIP_benchmark's default name holds the model's '/' and ':'), and every argument quoted
for the shell. Sets CLIP_benchmark cannot read (image folders, caption files, k-NN) get a `#` line saying so.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from vlp.eval.datasets import EvalError, open_eval_set, parse_spec
from vlp.eval.report import make_result, result_filename
from vlp.eval.suite import SuiteEntry

CB_WORKERS = 4   # CLIP_benchmark's --num_workers default


def clip_benchmark_model(model: str, checkpoint: str) -> tuple[str, str]:
    """CLIP_benchmark's `--model`/`--pretrained` for vlp's `--model`/`--checkpoint`: an export folder (or a run
    folder holding one) is `local-dir:EXPORT` with an empty `--pretrained`, since open_clip takes no folder as
    `pretrained` and does not know vlp's own model names; anything else is passed as given."""
    from vlp.models import EXPORT_CONFIG

    for folder in (Path(checkpoint), Path(checkpoint) / "export"):
        if (folder / EXPORT_CONFIG).is_file():
            return f"local-dir:{folder}", ""
    return model, checkpoint


def _shards(root: Path, split: str) -> int:
    try:
        return int((root / split / "nshards.txt").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return CB_WORKERS


def _cb_set(e: SuiteEntry) -> Optional[tuple[str, Path, Optional[str], dict]]:
    """(CLIP_benchmark dataset name, root, task, spec options) of a set CLIP_benchmark reads; None otherwise."""
    opts = parse_spec(e.spec)[1]
    if e.dataset is not None:
        root = Path(e.root).resolve()
        if not root.exists():
            raise EvalError(f"{e.dataset}: root {e.root} does not exist (a suite's relative roots are read "
                            "against the suite file's folder)")
        return e.dataset, root, e.task, opts
    es = open_eval_set(e.spec)
    if es.kind != "wds":
        return None
    name = es.name if es.name.startswith("wds/") else f"wds/{es.name}"
    return name, Path(es.root).resolve(), es.task, opts


def clip_benchmark_command(e: SuiteEntry, model: str, pretrained: str, amp: bool, recall_k) -> str:
    """One set's command (or a `#` line naming why CLIP_benchmark cannot score it), with the options that make
    its figures vlp's: vlp's `--recall_k` (CLIP_benchmark's default is 5 alone), the probe's held-out 20% of
    train (`--val_proportion 0.2`), `--no_amp` when vlp scored in fp32, and the root as an absolute path."""
    found = _cb_set(e)
    if found is None:
        return f"# {e.spec}: CLIP_benchmark reads only webdataset roots (wds/NAME); vlp eval scores this set"
    dataset, root, task, opts = found
    task = task or _task_of(e.spec)
    if task == "knn":
        return f"# {dataset}: CLIP_benchmark has no k-NN task; vlp eval scores this set"
    split = opts.get("split", "test")
    splits = [split] + ([opts.get("train_split", "train")] if task == "linear_probe" else [])
    workers = max(1, min(CB_WORKERS, *(_shards(root, s) for s in splits)))
    output = result_filename(make_result(dataset, task or "zeroshot_classification", {}, model=model,
                                         pretrained=pretrained))
    args = ["clip_benchmark", "eval", "--dataset", dataset, "--dataset_root", str(root), "--model", model,
            "--pretrained", pretrained]
    if task:
        args += ["--task", task]
    for key in ("fewshot_k", "train_split", "split"):
        if key in opts:
            args += [f"--{key}", opts[key]]
    if task == "zeroshot_retrieval":
        args += ["--recall_k", *(str(k) for k in recall_k)]
    if task == "linear_probe":
        args += ["--val_proportion", "0.2"]
    if not amp:
        args.append("--no_amp")
    args += ["--num_workers", str(workers), "--output", output]
    return shlex.join(args)


def clip_benchmark_commands(entries: list[SuiteEntry], model: str = "MODEL", pretrained: str = "PRETRAINED",
                            amp: bool = True, recall_k=(1, 5, 10)) -> list[str]:
    """`clip_benchmark_command` of each set, for vlp's `--model`/`--checkpoint` (`clip_benchmark_model`)."""
    model, pretrained = clip_benchmark_model(model, pretrained)
    return [clip_benchmark_command(e, model, pretrained, amp, recall_k) for e in entries]


def _task_of(spec: str) -> Optional[str]:
    """The task vlp scores a set with (a wds root says it in dataset_type.txt); CLIP_benchmark would otherwise
    take classification for any name it does not know (`wds/demo_retrieval`). None if the set cannot be opened."""
    try:
        return open_eval_set(spec).task
    except EvalError:
        return None
