"""What curation is worth: train on a noisy pool vs on what `vlp data filter` keeps of it, at equal steps.

    python -m benchmarks.curate_learning --bench icon_bench --work curate_runs --out curate.jsonl
    python -m benchmarks.curate_learning --bench icon_bench --work curate_runs --out curate.jsonl --ablation
    python -m benchmarks.curate_learning --work curate_runs --out curate.jsonl --table-only

The pool (`data_tools.make_noisy_pool`, seeded): the icon benchmark's 12,000 training images, 30 % of them with
captions shuffled among themselves and 20 % with boilerplate captions, plus 6,000 near-duplicate copies
(re-encoded, resized, cropped) with their own captions: 18,000 pairs, 6,000 of them the clean originals. The filter is bootstrapped from
the pool alone: the `pool` run of the first seed (the clip recipe trained on the pool) embeds the pool
(`vlp data embed`), and `vlp data filter` keeps what its rules keep; no held-out data, and not the pool's
`noise` labels, guides it (those labels only count, afterwards, what each rule removed). Every contender
trains the `clip` recipe with the learning benchmark's budget (vlp-icon, batch 128, lr 1e-3, wd 0.1,
warmup 100, fp32) for the same number of steps (186, two epochs of the clean set), and is scored on the
benchmark's held-out sets by vlp's evaluator. `--ablation` adds one contender per rule alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.learning import BUDGET, FIGURES, _mean_std, read_records, score_run, train_run

ROOT = Path(__file__).resolve().parents[1]
STEPS = 186
BUDGET_EQ = {**BUDGET, "epochs": 1000, "max-steps": STEPS}
# the recipe: caption rules, CLIP score (keep the top 70 %), exact and semantic duplicates
RULES = {
    "caption": ["--min-words", "1", "--max-caption-repeats", "20"],
    "clip_score": ["--top-fraction", "0.7"],
    "semdedup": ["--semdedup-eps", "AUTO", "--semdedup-clusters", "64"],
    "exact_dup": ["--dedup-image"],
}


def auto_eps(emb: Path, sample: int = 2000, seed: int = 0) -> float:
    """SemDeDup's eps from the pool alone: 1 - the 99.9th percentile of the cosine between random image pairs
    (a pair flagged as near-duplicate is closer than 999 in 1000 chance pairs). No labels, no held-out data."""
    import numpy as np

    from vlp.curate.store import load_tables

    x = load_tables(str(emb)).image.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i = np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False)
    sims = x[i] @ x[i].T
    return round(float(1 - np.quantile(sims[np.triu_indices(len(i), 1)], 0.999)), 4)


def _vlp(args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vlp", *args], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"error: vlp {' '.join(args[:2])} failed; see {log}")


def bench_view(work: Path, name: str, train_spec: str, bench: Path) -> Path:
    """A folder shaped like the icon benchmark (splits.json + eval/) whose training data is `train_spec`."""
    d = work / f"bench_{name}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "splits.json").write_text(json.dumps({"train": {"train_data": train_spec}}))
    if not (d / "eval").exists():
        (d / "eval").symlink_to((bench / "eval").resolve())
    return d


def curated(work: Path, pool_emb: Path, name: str, flags: list[str]) -> str:
    """Filter the pool with `flags`, reshard what is kept; -> the new shard spec."""
    out, shards = work / f"filter_{name}", work / f"shards_{name}"
    if not (shards / "sizes.json").is_file():
        _vlp(["data", "filter", "--embeddings", str(pool_emb), "--out", str(out), "--overwrite", *flags],
             work / f"filter_{name}.log")
        _vlp(["data", "reshard", "--decisions", str(out / "decisions.tsv"), "--output", str(shards),
              "--per-shard", "2000"], work / f"reshard_{name}.log")
    n = len(json.loads((shards / "sizes.json").read_text()))
    return str(shards / (f"{{00000..{n - 1:05d}}}.tar" if n > 1 else "00000.tar"))


def run(label: str, seed: int, bench_dir: Path, work: Path, out: Path, threads: int) -> None:
    if any(r["contender"] == label and r["seed"] == seed for r in read_records(out)):
        return
    rec = train_run(label, "clip", [], seed, bench_dir, work, BUDGET_EQ, threads)
    rec = score_run(rec, bench_dir, work, threads, clip_benchmark=False)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    v = rec["vlp"]
    print(f"{label} seed {seed}: " + ", ".join(f"{k} {100 * v[k]:.1f}" for k in FIGURES), flush=True)


def removed_by_kind(work: Path, pool: Path) -> dict:
    """Per filter: how many of each noise kind it removed (read from the pool's labels, after the fact)."""
    from vlp.data.shards import shard_urls
    from vlp.data.tario import read_shard

    kind = {}
    for url in shard_urls(str(pool / "*.tar")):
        for s in read_shard(url, exts=("json",)):
            kind[(url, s.key)] = s.meta().get("noise")
    out = {}
    for d in sorted(work.glob("filter_*")):
        if not (d / "decisions.tsv").is_file():
            continue
        counts: dict = {}
        for line in (d / "decisions.tsv").read_text().splitlines()[1:]:
            shard, key, reason = (line.split("\t") + [""])[:3]
            k = kind.get((os.path.realpath(shard), key), kind.get((shard, key), "?"))
            counts.setdefault(reason or "kept", {}).setdefault(k, 0)
            counts[reason or "kept"][k] += 1
        out[d.name[len("filter_"):]] = counts
    return out


def table(records: list[dict], base: str = "pool") -> str:
    by: dict = {}
    for r in records:
        by.setdefault(r["contender"], []).append(r)
    if base not in by:
        return "(no pool runs yet)"
    bstats = {f: _mean_std([r["vlp"][f] for r in by[base]]) for f in FIGURES}
    lines = ["| trained on | seeds | " + " | ".join(FIGURES) + " |", "|---" * (len(FIGURES) + 2) + "|"]
    for c, rs in by.items():
        cells = []
        for f in FIGURES:
            m, s = _mean_std([r["vlp"][f] for r in rs])
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}" + ("" if c == base else f" ({m / bstats[f][0]:.2f}x)"))
        lines.append(f"| {c} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--bench", default="icon_bench")
    p.add_argument("--work", default="curate_runs")
    p.add_argument("--out", default="curate.jsonl")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stage", choices=("pool", "filtered", "all"), default="all")
    p.add_argument("--ablation", action="store_true", help="also each rule alone (seeds as given)")
    p.add_argument("--variants", nargs="+", help="run only these (filtered, only_caption, ...)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    work, out, bench = Path(a.work), Path(a.out), Path(a.bench)
    if not a.table_only:
        work.mkdir(parents=True, exist_ok=True)
        pool = work / "pool"
        if not (pool / "sizes.json").is_file():
            from data_tools.make_noisy_pool import make_noisy_pool

            print(json.dumps(make_noisy_pool(str(bench / "train"), str(pool))), flush=True)
        n = len(json.loads((pool / "sizes.json").read_text()))
        pool_bench = bench_view(work, "pool", str(pool / f"{{00000..{n - 1:05d}}}.tar"), bench)
        for seed in a.seeds:
            run("pool", seed, pool_bench, work, out, a.threads)
        if a.stage == "pool":
            return 0
        emb = work / "pool_emb"
        if not (emb / "done.json").is_file():   # the scorer: the pool run of the first seed
            _vlp(["data", "embed", "--data", str(pool / "*.tar"), "--checkpoint",
                  str(work / "runs" / f"pool-s{a.seeds[0]}" / "export"), "--out", str(emb), "--batch-size", "256"],
                 work / "embed.log")
        eps = str(auto_eps(emb))
        rules = {k: [eps if x == "AUTO" else x for x in v] for k, v in RULES.items()}
        print(f"SemDeDup eps from the pool's own random-pair cosines: {eps}", flush=True)
        variants = {"filtered": [x for flags in rules.values() for x in flags]}
        if a.ablation:
            variants.update({f"only_{k}": v for k, v in rules.items()})
        if a.variants:
            variants = {k: variants[k] for k in a.variants if k in variants}   # in the order given
        for name, flags in variants.items():
            spec = curated(work, emb, name, flags)
            for seed in a.seeds:
                run(name, seed, bench_view(work, name, spec, bench), work, out, a.threads)
    print(table(read_records(out)))
    if work.is_dir():
        print(json.dumps(removed_by_kind(work, work / "pool"), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
