"""Effect sizes and tests for ablations run by benchmarks/learning.py: which difference costs what.

    python -m benchmarks.learning_ablation --out learning.jsonl                   # every contender against clip
    python -m benchmarks.learning_ablation --out learning.jsonl --reference clip-oc --figures styles val

Per contender and figure, over the seeds both it and --reference ran (vlp is deterministic, so a seed is
the same data order and initialisation on both sides and the pair isolates the one flag that differs):
  mean ± std of the contender; the mean paired difference (contender - reference, in points) ± its std;
  wins/losses/ties by seed; the paired t-test's and the Wilcoxon signed-rank test's two-sided p.
Then each contender against open_clip_train's runs pooled (its shuffle takes no seed, so its runs are not
pairs of anything): the ratio of means and Welch's t-test p.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

BASELINE = "open_clip_train"


def figures_of(records: list[dict], scorer: str = "vlp") -> list[str]:
    """The numeric figures the runs were scored on, in the order the first run lists them."""
    for r in records:
        if scorer in r:
            return [k for k, v in r[scorer].items() if isinstance(v, (int, float)) and k != "gap"]
    return []


def by_contender(records: list[dict], scorer: str = "vlp") -> dict[str, dict[int, dict]]:
    """contender -> seed -> figures (the last record wins when a seed ran twice under one label)."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        if scorer in r:
            out.setdefault(r["contender"], {})[r["seed"]] = r[scorer]
    return out


def _p(test, *args) -> float:
    """Two-sided p of a scipy test; 1.0 where every difference is zero (nothing to test)."""
    try:
        p = test(*args).pvalue
    except ValueError:
        return 1.0
    return 1.0 if p is None or math.isnan(p) else float(p)


def paired(ref: dict[int, dict], other: dict[int, dict], fig: str) -> dict:
    from scipy import stats

    seeds = sorted(set(ref) & set(other))
    d = [100 * (other[s][fig] - ref[s][fig]) for s in seeds]
    nonzero = [x for x in d if x]
    return {"n": len(seeds), "diff": statistics.fmean(d) if d else 0.0,
            "diff_std": statistics.stdev(d) if len(d) > 1 else 0.0,
            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d), "ties": d.count(0.0),
            # one seed that moved among ties still has a t (its std is not zero); Wilcoxon needs two to rank
            "t_p": _p(stats.ttest_rel, [100 * other[s][fig] for s in seeds], [100 * ref[s][fig] for s in seeds])
            if nonzero and len(d) > 1 else 1.0,
            "wilcoxon_p": _p(stats.wilcoxon, nonzero) if len(nonzero) > 1 else 1.0}


def _fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def baseline_labels(records: list[dict]) -> set[str]:
    """Every label open_clip_train ran under (its draws: 'open_clip_train', 'open_clip_train-again', ...)."""
    return {r["contender"] for r in records if r.get("recipe", r["contender"]) == BASELINE}


def paired_table(runs: dict[str, dict[int, dict]], reference: str, figures: list[str], skip: set[str]) -> str:
    lines = [f"| contender | seeds paired with {reference} | figure | contender | difference (points) | "
             "wins/losses/ties | paired t p | Wilcoxon p |", "|---" * 8 + "|"]
    for c, rs in runs.items():
        if c == reference or c in skip or not set(rs) & set(runs[reference]):
            continue
        for f in figures:
            st = paired(runs[reference], rs, f)
            xs = [100 * rs[s][f] for s in sorted(rs)]
            m, sd = statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
            lines.append(f"| {c} | {st['n']} | {f} | {m:.1f} ± {sd:.1f} | {st['diff']:+.2f} ± {st['diff_std']:.2f} | "
                         f"{st['wins']}/{st['losses']}/{st['ties']} | {_fmt_p(st['t_p'])} | {_fmt_p(st['wilcoxon_p'])} |")
    return "\n".join(lines)


def pooled_table(runs: dict[str, dict[int, dict]], records: list[dict], figures: list[str],
                 scorer: str = "vlp") -> str:
    from scipy import stats

    pool = [r[scorer] for r in records if scorer in r and r.get("recipe", r["contender"]) == BASELINE]
    if not pool:
        return ""
    head = [f"| contender (against {BASELINE}, {len(pool)} runs pooled) | seeds | "
            + " | ".join(f"{f}: ratio, Welch p" for f in figures) + " |", "|---" * (len(figures) + 2) + "|"]
    lines = []
    skip = baseline_labels(records)
    for c, rs in runs.items():
        if c in skip:
            continue
        cells = []
        for f in figures:
            xs, ys = [v[f] for v in rs.values()], [v[f] for v in pool]
            ratio = statistics.fmean(xs) / statistics.fmean(ys) if statistics.fmean(ys) else float("nan")
            p = _p(lambda x, y: stats.ttest_ind(x, y, equal_var=False), xs, ys) if len(xs) > 1 and len(ys) > 1 else 1.0
            cells.append(f"{ratio:.2f}x, {_fmt_p(p)}")
        lines.append(f"| {c} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(head + lines)


def main(argv=None) -> int:
    from benchmarks.learning import read_records

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", default="learning.jsonl", help="the runs benchmarks/learning.py appended")
    p.add_argument("--reference", default="clip", help="the contender every other one is paired with")
    p.add_argument("--figures", nargs="+", help="default: every figure the runs were scored on")
    p.add_argument("--scorer", choices=("vlp", "clip_benchmark"), default="vlp")
    a = p.parse_args(argv)
    records = read_records(Path(a.out))
    runs = by_contender(records, a.scorer)
    if a.reference not in runs:
        print(f"error: no runs of '{a.reference}' in {a.out} (have: {', '.join(runs) or 'none'})", file=sys.stderr)
        return 2
    figures = a.figures or figures_of(records, a.scorer)
    print(paired_table(runs, a.reference, figures, baseline_labels(records)))
    print()
    print(pooled_table(runs, records, figures, a.scorer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
