"""Zero-shot classification, retrieval and embedding geometry for vlp / open_clip checkpoints.

    python eval_zeroshot.py --checkpoint logs/run1/checkpoints/step_00001000.pt --data demo/eval/demo_colors
    python eval_zeroshot.py --checkpoint logs/run1 --data demo/eval/*          # every checkpoint of a run, + plot
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --model ViT-B-32 \\
        --data '/data/imagenet/val?classnames=imagenet' '/data/coco_5k.csv?name=coco' --output results/

--checkpoint: a vlp checkpoint (knows its model), an export folder, an open_clip weights file (give --model),
or a run folder (vlp's RUN/checkpoints/step_*.pt in step order, or open_clip_train's epoch_N.pt in epoch
order, given --model; output defaults to RUN/eval and a metrics_vs_step.png is drawn). Without --checkpoint, --model is scored with random weights.
--data: CLIP_benchmark wds roots, image folders (one sub-folder per class) or CSV/TSV/JSONL caption files, each
optionally followed by `?name=..&task=..&classnames=..&templates=..&split=..&root=..` (quote it in the shell;
see vlp/eval/datasets.py); `task=linear_probe|knn|image_caption_selection` as well as CLIP_benchmark's two;
or a suite file (`suite.yaml`, see vlp/eval/suite.py), which adds suite.csv/.md/.json: one row per checkpoint,
one column per set, the weighted mean over sets.
Writes one CLIP_benchmark-schema JSON per (checkpoint, dataset, task) and prints a summary table.
Bad input ends with one line on stderr and exit status 2; nothing is written unless everything succeeded.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

from vlp.flags import Answer, Parser, check

PRECISIONS = ["auto", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32"]

# What a run folder's checkpoint names count: vlp writes step_XXXXXXXX.pt, open_clip_train epoch_N.pt
# (its epoch_latest.pt repeats the newest one and is skipped).
RUN_CHECKPOINTS = (("step", re.compile(r"^step_(\d+)\.pt$")), ("epoch", re.compile(r"^epoch_(\d+)\.pt$")))


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--pretrained", dest="checkpoint", default=None,
                   help="vlp checkpoint, export folder, open_clip weights file (with --model), or run folder; "
                        "'' (CLIP_benchmark's form with --model local-dir:EXPORT) means none")
    p.add_argument("--model", default=None, help="open_clip model name or JSON config (needed for open_clip files); "
                                                 "local-dir:EXPORT (CLIP_benchmark's form) is --checkpoint EXPORT")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (hf:DIR / spm:FILE); default: the checkpoint's")
    p.add_argument("--data", "--dataset", dest="data", nargs="+", required=True,
                   help="eval set specs; with --dataset_root, CLIP_benchmark dataset names (wds/NAME)")
    p.add_argument("--dataset_root", "--dataset-root", dest="dataset_root", default=None,
                   help="CLIP_benchmark's: the root of each wds/NAME dataset, a template with {dataset} "
                        "(NAME) or {dataset_cleaned} (NAME with '/' -> '-')")
    p.add_argument("--task", default="auto", choices=["auto", "zeroshot_classification", "zeroshot_retrieval",
                                                      "linear_probe", "knn", "image_caption_selection"],
                   help="CLIP_benchmark's: the task of every set (auto: each set's own, from dataset_type.txt)")
    p.add_argument("--split", default=None, help="CLIP_benchmark's: the split of every set (default: test)")
    p.add_argument("--output", default=None,
                   help="output folder (default: RUN/eval for a run folder, else ./eval_results), or CLIP_benchmark's "
                        "file template, e.g. '{dataset}_{task}.json' (keys: dataset, pretrained, model, language, "
                        "task)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=256)
    p.add_argument("--workers", "--num_workers", dest="workers", type=int, default=None,
                   help="image decoding worker processes (default: min(4, CPUs) on CUDA; 0 on CPU, where the "
                        "workers would take cores from the model: the demo's three sets took 10.0-10.8 s with 0 "
                        "and 12.4-13.8 s with 2 on 2 cores)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="open_clip's names (see train.py --help): amp = fp16 autocast (bf16 on CPU), amp_bf16 = bf16 "
                        "autocast, bf16/fp16/pure_* = 16-bit weights; auto = a vlp checkpoint's training precision, "
                        "else amp on CUDA, fp32 on CPU")
    p.add_argument("--no_amp", dest="precision", action="store_const", const="fp32",
                   help="CLIP_benchmark's: same as --precision fp32")
    p.add_argument("--amp", dest="precision", action="store_const", const="amp",
                   help="CLIP_benchmark's: same as --precision amp")
    p.add_argument("--language", nargs="+", default=["en"],
                   help="CLIP_benchmark's: only en (vlp reads each set's own class names and templates)")
    p.add_argument("--save-clf", "--save_clf", action=Answer, nargs="?",
                   answer="CLIP_benchmark's; vlp does not save the zero-shot classifier (its prompts' features "
                          "are rebuilt from the set's class names and templates in well under a second per 1000)")
    p.add_argument("--classnames", default=None,
                   help="class names for sets that do not name their own: FILE, 'imagenet' or 'folders'")
    p.add_argument("--templates", default=None, help="templates for sets that do not name their own: FILE, 'openai', 'simple'")
    p.add_argument("--recall-k", "--recall_k", dest="recall_k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--per-class", action="store_true", help="add per-class accuracy and top confusions to the JSON")
    p.add_argument("--ties", choices=["clip_benchmark", "positive_wins"], default="clip_benchmark",
                   help="retrieval and compositional ties: clip_benchmark (default) = topk order / argmax, as "
                        "CLIP_benchmark, so figures compare with published tables; positive_wins = a negative within "
                        "1e-6 of the positive ties, in the positive's favour. Recorded in each result as vlp.ties")
    p.add_argument("--fewshot-k", "--fewshot_k", dest="fewshot_k", type=int, default=-1,
                   help="linear probe: training samples per class (-1: all)")
    p.add_argument("--seed", type=int, default=0, help="linear probe: held-out split and few-shot draw")
    p.add_argument("--knn-k", dest="knn_k", type=int, nargs="+", default=[1, 10, 20], help="k-NN: neighbour counts")
    p.add_argument("--feature-cache", "--feature_root", dest="feature_cache", default=None,
                   help="linear probe / k-NN: folder of cached float16 features (default: $VLP_FEATURE_CACHE or "
                        "~/.cache/vlp/features; 'none' to keep nothing)")
    p.add_argument("--clip-benchmark-commands", action="store_true",
                   help="print the clip_benchmark eval command of each set (however named) and exit: runnable as "
                        "printed (--num_workers within the set's shards, an --output per set)")
    p.add_argument("--no-geometry", action="store_true", help="skip the geometry figures")
    p.add_argument("--steps", default=None,
                   help="run folder only: evaluate only these steps (epochs for open_clip_train runs), e.g. '1000,2000'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from vlp.eval.evalset import EvalError

    a = check(p, argv, EvalError)
    if a.language != ["en"]:
        raise EvalError(f"--language {' '.join(a.language)}: vlp scores the class names and templates each set "
                        "gives (only en)")
    if a.checkpoint == "":                        # CLIP_benchmark's --pretrained '' beside --model local-dir:
        a.checkpoint = None
    if a.model and a.model.startswith("local-dir:") and a.checkpoint is None:
        a.model, a.checkpoint = None, a.model[len("local-dir:"):]
    return a


def clip_benchmark_specs(datasets: list[str], dataset_root: Optional[str], task: str, split: Optional[str],
                         skip=lambda arg: False) -> list[str]:
    """CLIP_benchmark's `--dataset wds/NAME --dataset_root ROOT --task T --split S` as vlp eval-set specs
    (vlp reads local wds roots and downloads nothing, so only wds/ names are accepted with a root)."""
    specs = []
    for ds in datasets:
        if skip(ds):  # a suite file names its own sets
            specs.append(ds)
            continue
        opts = []
        if dataset_root is not None:
            if not ds.startswith("wds/"):
                from vlp.eval.datasets import EvalError

                raise EvalError(f"--dataset {ds}: vlp reads CLIP_benchmark's webdataset layout (wds/NAME under "
                                "--dataset_root) and downloads nothing; for other sets give a path with --data")
            name = ds[len("wds/"):]
            path = dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
            opts.append(f"name={ds}")
        else:
            path = ds
        if task != "auto":
            opts.append(f"task={task}")
        if split:
            opts.append(f"split={split}")
        if opts:
            path += ("&" if "?" in path else "?") + "&".join(opts)
        specs.append(path)
    return specs


def find_checkpoints(path: Path) -> Optional[tuple[str, list[tuple[int, Path]]]]:
    """A run folder's (or checkpoints folder's) checkpoints in order, with what their number counts ("step" or
    "epoch"); None if `path` is not a folder."""
    if not path.is_dir():
        return None
    ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    names = list(ckdir.iterdir())
    for unit, pattern in RUN_CHECKPOINTS:
        found = sorted((int(m.group(1)), p) for p in names if (m := pattern.match(p.name)))
        if found:
            return unit, found
    return ("step", []) if (path / "checkpoints").is_dir() else None


def main(argv=None) -> int:
    from vlp.thread_env import check_omp_env

    check_omp_env()   # before torch is imported (libgomp reads OMP_NUM_THREADS then)
    from vlp.config import ConfigError
    from vlp.eval.evalset import EvalError

    try:
        return run(parse_args(argv))
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130


def run(a: argparse.Namespace) -> int:
    import torch

    from vlp.eval import evaluate
    from vlp.eval.datasets import EvalError, open_eval_set
    from vlp.eval.report import summary_table, write_results
    from vlp.eval.cb_commands import clip_benchmark_commands
    from vlp.eval.suite import SuiteEntry, aggregate, is_suite, load_suite, table_files
    from vlp.models import create_model, load_checkpoint, read_checkpoint_meta

    if a.batch_size < 1:
        raise EvalError("--batch-size must be >= 1")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.workers is None:
        a.workers = min(4, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0
    from vlp import precision as prec

    # Everything that can be checked without scoring is checked first.
    data = clip_benchmark_specs(a.data, a.dataset_root, a.task, a.split, skip=is_suite)
    entries = [e for arg in data for e in (load_suite(arg) if is_suite(arg) else [SuiteEntry(arg)])]
    if a.clip_benchmark_commands:
        amp = a.precision not in ("fp32", "auto") or (a.precision == "auto" and torch.device(device).type == "cuda")
        print("\n".join(clip_benchmark_commands(entries, a.model or "MODEL", a.checkpoint or "PRETRAINED", amp=amp,
                                                 recall_k=a.recall_k)))
        return 0
    if a.fewshot_k == 0 or a.fewshot_k < -1 or min(a.knn_k) < 1:
        raise EvalError("--fewshot-k must be -1 or >= 1, and every --knn-k >= 1")
    sets = [open_eval_set(e.spec, a.classnames, a.templates) for e in entries]
    for es in sets:
        es.samples()
    names = [(es.name, es.task) for es in sets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise EvalError(f"two eval sets are both named '{dup[0]}' ({dup[1]}): give one ?name=...")

    run_dir, unit = None, "step"
    jobs: list[tuple[Optional[int], Optional[str]]]          # (step, checkpoint path)
    if a.checkpoint is None:
        if not a.model:
            raise EvalError("give --checkpoint (or --model alone to score random weights)")
        jobs = [(None, None)]
    else:
        ck = Path(a.checkpoint)
        if not ck.exists():
            raise EvalError(f"checkpoint not found: {ck}")
        unit, steps = find_checkpoints(ck) or ("step", None)
        if steps is not None:
            if not steps:
                raise EvalError(f"{ck}: no step_XXXXXXXX.pt (vlp) or epoch_N.pt (open_clip_train) checkpoints in it")
            if a.steps:
                wanted = {int(s) for s in a.steps.split(",") if s.strip()}
                steps = [(s, p) for s, p in steps if s in wanted]
                if not steps:
                    raise EvalError(f"{ck}: none of the {unit}s {sorted(wanted)} has a checkpoint")
            run_dir = ck.parent if ck.name == "checkpoints" else ck
            jobs = [(s, str(p)) for s, p in steps]
            if a.model is None and read_checkpoint_meta(jobs[0][1]) is None:
                raise EvalError(f"{jobs[0][1]} is not a vlp checkpoint: give --model")
        else:
            jobs = [(None, str(ck))]
    out_dir = Path(a.output) if a.output else (run_dir / "eval" if run_dir else Path("eval_results"))
    template = None
    if "{" in out_dir.name:                       # CLIP_benchmark's --output '{dataset}_{task}.json'
        out_dir, template = out_dir.parent, out_dir.name
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise EvalError(f"--output {a.output}: {blocker} is a file, not a folder")

    results = []
    for i, (at, path) in enumerate(jobs):
        step = at if unit == "step" else None
        if path is None:
            bundle = create_model(a.model, tokenizer=a.tokenizer, device=device)
            pretrained = "random"
        else:
            bundle = load_checkpoint(path, model_name=a.model, tokenizer=a.tokenizer, device=device)
            # CLIP_benchmark's fields: an export folder is the model `local-dir:EXPORT` with pretrained ''
            pretrained = "" if bundle.model_name.startswith("local-dir:") else path
        if step is None and path is not None:
            step = (read_checkpoint_meta(path) or {}).get("step")
        # one precision policy: a vlp checkpoint is scored in its training precision unless --precision says otherwise
        name = prec.for_eval(a.precision, (read_checkpoint_meta(path) or {}).get("precision") if path else None)
        prec.cast_model(bundle.model, name)
        if len(jobs) > 1 and not a.quiet:
            print(f"[{i + 1}/{len(jobs)}] {path}", file=sys.stderr)
        # auto/amp/fp32 use the evaluator's own autocast switch; the other names score under their dtype's autocast
        amp = {"auto": None, "fp32": False, "amp": True}.get(name, False)
        with prec.eval_autocast("fp32" if name in ("auto", "amp", "fp32") else name, device):
            results += evaluate(bundle.model, bundle.tokenizer, bundle.preprocess_val, sets, device=device,
                                batch_size=a.batch_size, model_name=bundle.model_name, pretrained=pretrained,
                                amp=amp, num_workers=a.workers, recall_k=a.recall_k, geometry=not a.no_geometry,
                                per_class=a.per_class, progress=not a.quiet, step=step, ties=a.ties,
                                fewshot_k=a.fewshot_k, seed=a.seed, knn_k=a.knn_k,
                                feature_cache=False if str(a.feature_cache).lower() == "none" else a.feature_cache)
        for r in results[-len(sets):]:
            r["vlp"]["checkpoint"] = path
            if at is not None and unit != "step":
                r["vlp"][unit] = at
        del bundle
    table = None
    if any(is_suite(arg) for arg in a.data):
        table = table_files(aggregate(results, entries, names))
    from vlp.eval.plot import read_eval_rows, read_loss_curve

    written = write_results(results, out_dir, plot=run_dir is not None, extra=table, name_template=template,
                            loss_curve=read_loss_curve(run_dir) if run_dir is not None else None,
                            eval_rows=read_eval_rows(run_dir) if run_dir is not None else None)
    for r in results:
        if r["vlp"].get("skipped_images"):
            print(f"warning: {r['dataset']}: {r['vlp']['skipped_images']} image(s) could not be decoded and were left "
                  f"out (first: {r['vlp'].get('skipped_first', '?')})", file=sys.stderr)
    print(summary_table(results))
    if table:
        print("\n" + table["suite.md"])
    print(f"wrote {len(written)} file(s) to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
