"""Learning quality on real images: vlp's recipes against open_clip_train, same data, flags and budget.

    python -m benchmarks.learning --bench icon_bench --out learning.jsonl            # full table
    python -m benchmarks.learning --bench icon_bench_quick --quick --out quick.jsonl  # a few minutes
    python -m benchmarks.learning --out learning.jsonl --table-only                   # print the table again

    python -m benchmarks.learning --bench glyph_bench --out glyphs.jsonl               # the glyph benchmark

Data: a real-image benchmark folder: the icon benchmark (`data_tools.make_icon_bench`) or the glyph benchmark
(`data_tools.make_glyph_bench`); built into --bench first if that folder is empty (--kind says which).
Contenders, each trained in its own process with OMP_NUM_THREADS=--threads and the same budget
(vlp-icon: vlp-tiny at 48 px, a 4-layer width-128 ViT with 8 px patches and a 4-layer text tower with a
16-token context; batch 128, 2 epochs, lr 1e-3, wd 0.1, warmup 100, fp32, 1 loader worker, seed s):
  open_clip_train   `open_clip_train.main` with those flags (its own defaults otherwise: for a model name
                    without "vit", AdamW beta2 0.999 / eps 1e-8; its webdataset loader, with the empty
                    end-of-shard record of webdataset 1.x dropped, as benchmarks/loader.py does);
  clip, laclip, cua, fini, siglip   `train.py --config configs/NAME.yaml` plus the same flags;
  LABEL=RECIPE:FLAGS  an ablation: RECIPE's config plus extra train.py FLAGS (e.g.
                    'clip-b2=clip:--beta2 0.999 --eps 1e-8'); the pseudo-flag --decay-embeddings
                    applies weight decay to token/positional embeddings as open_clip_train does.
Each finished model is scored by vlp's evaluator and by CLIP_benchmark's own code (its wds reader,
zero-shot classifier and retrieval; top-1 from its logits with `.item()`, as its `accuracy()` breaks on
NumPy 2.x), both in this process with --threads threads. One JSON line per (contender, seed) is appended
to --out as soon as it is done, so an interrupted table continues (finished runs are skipped).
`--jobs N` trains N contenders at once (on a machine with 2 x N cores; scoring stays one at a time).

The table: per figure, mean ± std over seeds, and the ratio of the mean to open_clip_train's; `parity` counts
the figures whose mean is at least open_clip_train's mean minus one standard deviation (within noise, or better).
open_clip_train's sample shuffle is unseeded, so a rerun of its seeds is a new draw: run it again under another
label ('open_clip_train-again=open_clip_train:') and the baseline becomes all its runs pooled (a last row).
Figures, named by the bench's eval sets (`splits.json`; `<kind>_unseen_concepts` -> `concepts`, ...): zero-shot
top-1 on the validation set where the bench has one (`val`: trained concepts in training styles, pairs kept
out of training; the glyph bench), on held-out concepts (`concepts`), on held-out styles (`styles`), category
top-1 (`category`: Phosphor's categories, or a glyph's script/class), retrieval R@5 text->image (`t2i@5`) and
image->text (`i2t@5`), and the training wall time (`train_s`, the whole process: on a loaded machine this is
mostly other people's load). Choose recipes on `val`; the held-out figures are for reporting.
Use one --out per bench: a record names its bench kind, and only runs of the same kind are skipped as done.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("clip", "laclip", "cua", "fini", "siglip")
BASELINE = "open_clip_train"
BUDGET = {"model": "vlp-icon", "batch-size": 128, "epochs": 2, "lr": 1e-3, "wd": 0.1, "warmup": 100,
          "precision": "fp32", "workers": 1}
QUICK_BUDGET = {**BUDGET, "warmup": 10}
# eval set name suffix -> figure; the figures in table order (the retrieval set gives t2i@5 and i2t@5)
SUFFIXES = {"_val": "val", "_unseen_concepts": "concepts", "_unseen_styles": "styles", "_category": "category",
            "_retrieval": "retrieval"}
FIGURES = ("val", "concepts", "styles", "category", "t2i@5", "i2t@5")
CLASSIFICATION = ("val", "concepts", "styles", "category")


def bench_sets(bench: Path) -> tuple[str, dict[str, str]]:
    """-> (bench kind, figure -> eval set name) from the bench's splits.json: ('icons', {'concepts':
    'icons_unseen_concepts', ...}); the glyph bench adds 'val'."""
    names = json.loads((bench / "splits.json").read_text())["eval"]
    sets, kind = {}, None
    for n in names:
        for suffix, fig in SUFFIXES.items():
            if n.endswith(suffix):
                sets[fig], kind = n, n[: -len(suffix)]
    if kind is None:
        raise SystemExit(f"error: {bench}/splits.json names no eval set ending in {', '.join(SUFFIXES)}")
    return kind, sets


# open_clip_train under webdataset 1.x: drop the empty record each shard ends with (shared/reference.md);
# vlp.models registers vlp-tiny with open_clip.
_OPEN_CLIP_MAIN = """
import sys
import vlp.models  # noqa: F401
import open_clip_train.data as ocd
_orig = ocd.tar_file_expander
ocd.tar_file_expander = lambda *a, **k: (r for r in _orig(*a, **k) if r and "fname" in r)
from open_clip_train.main import main
sys.exit(1 if main(sys.argv[1:]) == -1 else 0)  # its errors ("Experiment already exists") return -1
"""
# vlp's train.py; with VLP_BENCH_DECAY_EMBEDDINGS=1 token/positional embeddings get weight decay (open_clip's rule)
_VLP_MAIN = """
import os, sys
sys.path.insert(0, os.getcwd())
if os.environ.get("VLP_BENCH_DECAY_EMBEDDINGS") == "1":
    from benchmarks.learning import decay_embeddings
    decay_embeddings()
sys.argv[0] = "train.py"
import train
sys.exit(train.main(sys.argv[1:]))
"""


def decay_embeddings() -> None:
    """Ablation: weight decay on 2-D embedding tables too (open_clip_train decays everything with ndim >= 2
    that is not a bias, norm or logit scale); vlp spares them by default."""
    import vlp.train.optim as optim

    orig = optim.no_decay_reason

    def no_decay_reason(name, param, module=None):
        reason = orig(name, param, module)
        return None if reason == "embedding" and param.ndim >= 2 else reason

    optim.no_decay_reason = no_decay_reason


def parse_contender(spec: str) -> tuple[str, str, list[str]]:
    """'clip' -> ('clip', 'clip', []); 'lbl=clip:--beta2 0.999' -> ('lbl', 'clip', ['--beta2', '0.999'])."""
    if "=" not in spec:
        return spec, spec, []
    label, _, rest = spec.partition("=")
    recipe, _, flags = rest.partition(":")
    return label, recipe, flags.split()


def _flags(budget: dict) -> list[str]:
    return [x for k, v in budget.items() for x in (f"--{k}", str(v))]


def train_command(recipe: str, extra: list[str], spec: str, seed: int, logs: Path, name: str,
                  budget: dict) -> tuple[list[str], dict]:
    env = {}
    if recipe == BASELINE:
        cmd = [sys.executable, "-c", _OPEN_CLIP_MAIN, "--train-data", spec, "--dataset-type", "webdataset",
               *_flags(budget), "--seed", str(seed), "--logs", str(logs), "--name", name, "--save-frequency", "1",
               "--log-every-n-steps", "50", "--report-to", "", *extra]
        return cmd, env
    if recipe not in RECIPES:
        raise SystemExit(f"error: unknown recipe '{recipe}' (known: {BASELINE}, {', '.join(RECIPES)})")
    if "--decay-embeddings" in extra:
        extra = [x for x in extra if x != "--decay-embeddings"]
        env["VLP_BENCH_DECAY_EMBEDDINGS"] = "1"
    cmd = [sys.executable, "-c", _VLP_MAIN, "--config", str(ROOT / "configs" / f"{recipe}.yaml"),
           "--train-data", spec, *_flags(budget), "--seed", str(seed), "--logs", str(logs), "--name", name,
           "--report-to", "none", "--save-every", "1000000", "--log-every", "50", "--no-progress", *extra]
    return cmd, env


def trained_model(recipe: str, logs: Path, name: str):
    from vlp.models import load_checkpoint

    if recipe == BASELINE:
        ckpts = sorted((logs / name / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        return load_checkpoint(str(ckpts[-1]), model_name=BUDGET["model"])
    return load_checkpoint(str(logs / name / "export"))


def score_vlp(bundle, bench: Path) -> dict:
    from vlp.eval import evaluate

    _, sets = bench_sets(bench)
    res = evaluate(bundle.model, bundle.tokenizer, bundle.preprocess_val, [str(bench / "eval" / s) for s in
                                                                           sets.values()],
                   batch_size=256, amp=False, geometry=True, cache_images=False)
    m = {r["dataset"].split("/")[-1]: r["metrics"] for r in res}
    out = {k: m[sets[k]]["acc1"] for k in CLASSIFICATION if k in sets}
    r = m[sets["retrieval"]]
    out.update({"t2i@5": r["image_retrieval_recall@5"], "i2t@5": r["text_retrieval_recall@5"],
                "gap": r.get("geometry/modality_gap")})
    return out


def score_clip_benchmark(bundle, bench: Path) -> dict:
    """The same figures by CLIP_benchmark's own reader, classifier and retrieval code."""
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    out = {}
    model = bundle.model.eval()
    for k, name in bench_sets(bench)[1].items():
        root = bench / "eval" / name
        task = "zeroshot_retrieval" if k == "retrieval" else "zeroshot_classification"
        ds = build_dataset("wds/" + root.name, root=str(root), transform=bundle.preprocess_val, split="test",
                           task=task)
        loader = torch.utils.data.DataLoader(ds.batched(256), batch_size=None, shuffle=False, num_workers=0)
        if k == "retrieval":
            m = zr.evaluate(model, loader, bundle.tokenizer, "cpu", amp=False, recall_k_list=[5])
            out.update({"t2i@5": m["image_retrieval_recall@5"], "i2t@5": m["text_retrieval_recall@5"]})
            continue
        clf = zc.zero_shot_classifier(model, bundle.tokenizer, ds.classes, ds.templates, "cpu", amp=False)
        logits, target = zc.run_classification(model, clf, loader, "cpu", amp=False)
        out[k] = (logits.argmax(1) == target).float().mean().item()
    return out


def train_run(label, recipe, extra, seed, bench, work, budget, threads) -> dict:
    """Train one contender in its own process; -> the record so far (wall time of the whole process)."""
    name = f"{label}-s{seed}"
    spec = json.loads((bench / "splits.json").read_text())["train"]["train_data"]
    cmd, env = train_command(recipe, extra, spec, seed, work / "runs", name, budget)
    env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p])}
    log, done = work / f"{name}.log", work / f"{name}.done.json"
    rec = {"contender": label, "recipe": recipe, "extra": extra, "seed": seed, "budget": budget, "name": name,
           "bench": bench_sets(bench)[0]}
    if done.is_file() and json.loads(done.read_text())["cmd"] == cmd:  # trained earlier, not yet scored
        return {**rec, "train_s": json.loads(done.read_text())["train_s"]}
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a killed run's leftovers: never score those
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    train_s = round(time.perf_counter() - t0, 1)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{name} failed (exit {rc}); see {log}: {' | '.join(tail)}")
    done.write_text(json.dumps({"cmd": cmd, "train_s": train_s}))
    return {**rec, "train_s": train_s}


def score_run(rec: dict, bench: Path, work: Path, threads: int, clip_benchmark: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    bundle = trained_model(rec["recipe"], work / "runs", rec["name"])
    t1 = time.perf_counter()
    rec = {**rec, "vlp": score_vlp(bundle, bench)}
    if clip_benchmark:
        rec["clip_benchmark"] = score_clip_benchmark(bundle, bench)
    rec["eval_s"] = round(time.perf_counter() - t1, 1)
    return rec


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(records: list[dict], scorer: str = "vlp") -> str:
    """Markdown table: mean ± std per figure over seeds, ratio to open_clip_train's mean.

    open_clip_train's sample shuffle takes no seed (webdataset seeds it from pid and time), so rerunning one
    of its seeds draws afresh. When more than one label ran it ('again=open_clip_train:'), every ratio and
    parity is against all its runs pooled, shown as a last row, and each draw is scored against the pool."""
    by: dict[str, list[dict]] = {}
    for r in records:
        if scorer in r:
            by.setdefault(r["contender"], []).append(r)
    base_runs = [r for rs in by.values() for r in rs if r.get("recipe", r["contender"]) == BASELINE]
    labels = {r["contender"] for r in base_runs}
    if len(labels) > 1:
        by[f"{BASELINE}, all {len(base_runs)} runs"] = base_runs
    elif labels:
        base_runs = by[labels.pop()]  # the row that is the baseline itself
    figures = [f for f in FIGURES if any(f in r[scorer] for rs in by.values() for r in rs)]
    cols = figures + ["train_s"]

    def stats(rs: list[dict], f: str) -> tuple[float, float]:
        return _mean_std([r["train_s"] if f == "train_s" else r[scorer][f] for r in rs])

    base = {f: stats(base_runs, f) for f in cols} if base_runs else None  # once, not per row
    lines = [f"| contender ({scorer}) | seeds | " + " | ".join(cols) + " | parity |", "|---" * (len(cols) + 3) + "|"]
    for c, rs in by.items():
        scored = base is not None and rs is not base_runs
        cells, level = [], 0
        for f in cols:
            m, s = stats(rs, f)
            cell = f"{m:.0f} ± {s:.0f}" if f == "train_s" else f"{100 * m:.1f} ± {100 * s:.1f}"
            if scored:
                bm, bs = base[f]
                cell += f" ({m / bm:.2f}x)" if bm else ""
                level += f != "train_s" and m >= bm - bs
            cells.append(cell)
        # parity: figures whose mean is at least the baseline's mean minus one standard deviation (within noise or better)
        verdict = f"{level}/{len(figures)}" if scored else ""
        lines.append(f"| {c} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_bench(bench: Path, kind: str, cache: str, quick: bool) -> None:
    if kind == "glyphs":
        from data_tools.make_glyph_bench import FULL, QUICK, build
    else:
        from data_tools.make_icon_bench import FULL, QUICK, build
    print(f"building the {kind} benchmark into {bench} ...", flush=True)
    build(bench, cache, progress=False, **(QUICK if quick else FULL))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--bench", default="icon_bench", help="benchmark folder (built here if missing, see --kind)")
    p.add_argument("--kind", choices=("icons", "glyphs"), default="icons",
                   help="which benchmark to build into a missing --bench (default icons)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "vlp" / "npm"), help="npm tarball cache")
    p.add_argument("--quick", action="store_true", help="quick bench, open_clip_train vs clip, one seed, warmup 10")
    p.add_argument("--contenders", nargs="+", help=f"default: {BASELINE} {' '.join(RECIPES)} (quick: {BASELINE} clip)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads per training and evaluation")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (a 16-core machine: --jobs 8 --threads 2)")
    p.add_argument("--epochs", type=int, help="override the budget's epochs (recorded with each run)")
    p.add_argument("--work", default="learning_runs", help="folder for run logs and checkpoints")
    p.add_argument("--out", default="learning.jsonl", help="one JSON line per finished run (appended)")
    p.add_argument("--no-clip-benchmark", action="store_true", help="score with vlp's evaluator only")
    p.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    a = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # CLIP_benchmark's progress bars (tqdm reads this on import)
    out = Path(a.out)
    if not a.table_only:
        bench, work = Path(a.bench), Path(a.work)
        if not (bench / "splits.json").is_file():
            build_bench(bench, a.kind, a.cache, a.quick)
        kind = bench_sets(bench)[0]
        contenders = a.contenders or ([BASELINE, "clip"] if a.quick else [BASELINE, *RECIPES])
        seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
        budget = dict(QUICK_BUDGET if a.quick else BUDGET)
        if a.epochs:
            budget["epochs"] = a.epochs
        done = {(r["contender"], r["seed"]) for r in read_records(out)
                if r["budget"] == budget and r.get("bench", "icons") == kind}
        work.mkdir(parents=True, exist_ok=True)
        todo = [(seed, *parse_contender(c)) for seed in seeds for c in contenders]
        todo = [t for t in todo if (t[1], t[0]) not in done]
        failed = 0
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:  # trainings in parallel, scoring one at a time
            futures = [pool.submit(train_run, label, recipe, extra, seed, bench, work, budget, a.threads)
                       for seed, label, recipe, extra in todo]
            for fut in as_completed(futures):
                try:
                    rec = score_run(fut.result(), bench, work, a.threads, not a.no_clip_benchmark)
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    failed += 1
                    continue
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                v = rec["vlp"]
                print(f"{rec['contender']} seed {rec['seed']}: train {rec['train_s']:.0f} s, eval {rec['eval_s']:.0f} s; "
                      + ", ".join(f"{k} {100 * v[k]:.1f}" for k in FIGURES if k in v), flush=True)
        if failed:
            print(f"{failed} runs failed", file=sys.stderr)
    records = read_records(out)
    print(f"\n{len(records)} runs from {out}; figures in %, mean ± std over seeds, (ratio to {BASELINE}); "
          f"{os.cpu_count()} CPUs, {a.threads} threads")
    print(table(records, "vlp"))
    if any("clip_benchmark" in r for r in records):
        print()
        print(table(records, "clip_benchmark"))
    return 1 if not a.table_only and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
