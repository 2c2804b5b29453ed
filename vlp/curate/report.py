"""The filter's report: counts per rule (JSON and markdown), CLIP-score histograms, and contact sheets of
what each rule removed (the eye is the check users trust).

Both engines hand the same `Summary` to `write_report`: the single-process filter computes it from the whole
table (`summarise`), the Ray filter from per-block sums (`vlp.curate.ray_filter`). What goes on a contact
sheet is chosen by a seeded hash of each sample's pool position, so both engines show the same samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from vlp.curate.dedup import mix64
from vlp.curate.store import Table, atomic_write

BINS = 50


@dataclass
class Summary:
    samples: int
    kept: int
    counts: list[dict]
    score_sum: tuple = (0.0, 0, 0.0, 0)        # (sum, n) over valid rows, then over kept rows (float64 sums)
    hist: Optional[tuple] = None              # (bin edges, counts of all valid rows, counts of kept rows)
    picks: dict = field(default_factory=dict)  # reason -> [{"shard", "key", "score", "caption"}]


def score_edges(lo: float, hi: float) -> np.ndarray:
    return np.linspace(lo, hi + 1e-6, BINS)


def pick_rows(order: np.ndarray, reason: np.ndarray, per_rule: int, seed: int) -> dict[str, np.ndarray]:
    """Per reason, the `per_rule` removed rows of lowest hash (positions into `order`), in pool order."""
    out = {}
    h = mix64(order, seed)
    for r in sorted(set(reason.tolist()) - {""}):
        rows = np.flatnonzero(reason == r)
        rows = rows[np.lexsort((order[rows], h[rows]))][:per_rule]
        out[r] = rows[np.argsort(order[rows])]
    return out


def summarise(t: Table, reason: np.ndarray, counts: list[dict], per_rule: int = 24, seed: int = 0) -> Summary:
    ok = t.valid & np.isfinite(t.score)
    kept = reason == ""
    s = t.score.astype(np.float64)
    out = Summary(len(t), int(kept.sum()), counts,
                  (float(s[ok].sum()), int(ok.sum()), float(s[ok & kept].sum()), int((ok & kept).sum())))
    if ok.any():
        edges = score_edges(float(t.score[ok].min()), float(t.score[ok].max()))
        out.hist = (edges, np.histogram(t.score[ok], edges)[0], np.histogram(t.score[ok & kept], edges)[0])
    out.picks = {r: [{"shard": str(t.shard[i]), "key": str(t.key[i]), "score": float(t.score[i]),
                      "caption": str(t.caption[i])} for i in rows]
                 for r, rows in pick_rows(t.order, reason, per_rule, seed).items()}
    return out


def markdown(counts: list[dict], n: int, kept: int) -> str:
    lines = [f"{n} samples, {kept} kept ({100 * kept / max(n, 1):.1f} %)", "",
             "| rule | parameters | removed (in order) | removed alone |", "|---|---|---|---|"]
    for c in counts:
        params = ", ".join(f"{k}={v}" for k, v in c["params"].items() if v is not None)
        lines.append(f"| {c['rule']} | {params} | {c['removed']} | {c['alone']} |")
    return "\n".join(lines) + "\n"


def score_histogram(path: Path, edges: np.ndarray, all_counts: np.ndarray, kept_counts: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(edges[:-1], bins=edges, weights=all_counts, alpha=0.5, label="all")
    ax.hist(edges[:-1], bins=edges, weights=kept_counts, alpha=0.5, label="kept")
    ax.set_xlabel("image-text cosine")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def contact_sheets(out: Path, picks: dict[str, list[dict]]) -> list[str]:
    """One PNG per rule; images are read back from the shards by the one sample reader."""
    from data_tools.contact_sheet import contact_sheet
    from vlp.data.tario import TarError, read_shard

    want: dict[str, set] = {}
    for rows in picks.values():
        for p in rows:
            want.setdefault(p["shard"], set()).add(p["key"])
    images = {}
    for shard, keys in want.items():
        try:
            for s in read_shard(shard, retries=2):
                if s.key in keys:
                    images[(shard, s.key)] = s.image
        except TarError:
            continue   # a shard gone since embedding: its samples show as grey boxes
    written = []
    for r, rows in picks.items():
        samples = [{"image": images.get((p["shard"], p["key"])), "key": p["key"],
                    "caption": f"{p['score']:.3f} {p['caption']}"} for p in rows]
        written.append(str(contact_sheet(samples, str(out / f"removed_{r}.png"), thumb=96)))
    return written


def write_report(out: Path, s: Summary, sheets: bool = True) -> str:
    out = Path(out)
    report = {"samples": s.samples, "kept": s.kept, "rules": s.counts}
    if s.hist is not None:
        all_sum, n_all, kept_sum, n_kept = s.score_sum
        report["score"] = {"mean_all": all_sum / n_all if n_all else None,
                           "mean_kept": kept_sum / n_kept if n_kept else None}
        score_histogram(out / "scores.png", *s.hist)
    if sheets:
        report["contact_sheets"] = contact_sheets(out, s.picks)
    md = markdown(s.counts, s.samples, s.kept)
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    atomic_write(out / "report.md", lambda f: f.write(md.encode()))
    return md
