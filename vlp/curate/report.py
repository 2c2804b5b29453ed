"""The filter's report: counts per rule (JSON and markdown), CLIP-score histograms, and contact sheets of
what each rule removed (the eye is the check users trust)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlp.curate.store import Table, atomic_write


def markdown(counts: list[dict], n: int, kept: int) -> str:
    lines = [f"{n} samples, {kept} kept ({100 * kept / max(n, 1):.1f} %)", "",
             "| rule | parameters | removed (in order) | removed alone |", "|---|---|---|---|"]
    for c in counts:
        params = ", ".join(f"{k}={v}" for k, v in c["params"].items() if v is not None)
        lines.append(f"| {c['rule']} | {params} | {c['removed']} | {c['alone']} |")
    return "\n".join(lines) + "\n"


def score_histogram(path: Path, t: Table, reason: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = t.valid & np.isfinite(t.score)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(t.score[ok].min()), float(t.score[ok].max()) + 1e-6, 50) if ok.any() else 10
    ax.hist(t.score[ok], bins=bins, alpha=0.5, label="all")
    ax.hist(t.score[ok & (reason == "")], bins=bins, alpha=0.5, label="kept")
    ax.set_xlabel("image-text cosine")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def removed_samples(t: Table, reason: np.ndarray, per_rule: int, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    out = {}
    for r in sorted(set(reason) - {""}):
        rows = np.flatnonzero(reason == r)
        out[r] = sorted(rng.choice(rows, min(per_rule, len(rows)), replace=False).tolist())
    return out


def contact_sheets(out: Path, t: Table, picks: dict[str, list[int]]) -> list[str]:
    """One PNG per rule; images are read back from the shards by the one sample reader."""
    from data_tools.contact_sheet import contact_sheet
    from vlp.data.tario import TarError, read_shard

    want: dict[str, set] = {}
    for rows in picks.values():
        for i in rows:
            want.setdefault(str(t.shard[i]), set()).add(str(t.key[i]))
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
        samples = [{"image": images.get((str(t.shard[i]), str(t.key[i]))), "key": str(t.key[i]),
                    "caption": f"{t.score[i]:.3f} {t.caption[i]}"} for i in rows]
        written.append(str(contact_sheet(samples, str(out / f"removed_{r}.png"), thumb=96)))
    return written


def write_report(out: Path, t: Table, reason: np.ndarray, counts: list[dict], sheets: bool = True,
                 seed: int = 0, per_rule: int = 24) -> str:
    out = Path(out)
    kept = int((reason == "").sum())
    report = {"samples": len(t), "kept": kept, "rules": counts}
    if len(t) and t.valid.any():
        ok = t.valid & np.isfinite(t.score)
        kept_ok = ok & (reason == "")
        report["score"] = {"mean_all": float(t.score[ok].mean()) if ok.any() else None,
                           "mean_kept": float(t.score[kept_ok].mean()) if kept_ok.any() else None}
        score_histogram(out / "scores.png", t, reason)
    if sheets:
        report["contact_sheets"] = contact_sheets(out, t, removed_samples(t, reason, per_rule, seed))
    md = markdown(counts, len(t), kept)
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    atomic_write(out / "report.md", lambda f: f.write(md.encode()))
    return md
