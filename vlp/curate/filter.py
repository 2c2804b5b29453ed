"""`vlp data filter`: composable curation rules over `vlp data embed`'s tables, each one counted.

    vlp data filter --embeddings pool_emb --out pool_filter --min-words 2 --max-caption-repeats 50 \
        --min-side 200 --max-aspect 3 --top-fraction 0.3 --dedup-image --semdedup-eps 0.05 \
        --balance entries.txt --balance-t 20000

Rules run in this order, each on what the ones before it kept: unreadable (no image or caption), caption
words, caption repeats, image size/aspect, exact duplicates (image bytes; image bytes + caption), CLIP score,
SemDeDup near-duplicates, MetaCLIP balancing. Duplicates are resolved after the cheap rules so the copy that
stays is one that survives them. Output in --out: `decisions.tsv` (shard, key, reason; an empty reason: kept),
the input of `vlp data reshard`; `report.json` / `report.md` (per rule: removed in order, and removed when run
alone on the whole pool); `scores.png` (CLIP-score histograms, all vs kept); `removed_RULE.png` contact sheets.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from vlp.curate.report import summarise, write_report
from vlp.curate.store import CurateError, Table, atomic_write, load_tables
from vlp.flags import Parser


def build_rules(a) -> list[tuple[str, dict, object]]:
    """(name, parameters, rule) for each rule the flags ask for, in the order they run."""
    from vlp.curate import balance as B
    from vlp.curate import dedup as D
    from vlp.curate import rules as R

    out = []
    if a.min_words or a.max_words is not None:
        out.append(("caption_words", {"min": a.min_words, "max": a.max_words}, R.caption_words(a.min_words, a.max_words)))
    if a.max_caption_repeats is not None:
        out.append(("caption_repeats", {"max": a.max_caption_repeats}, R.caption_repeats(a.max_caption_repeats)))
    if a.min_side or a.max_aspect is not None:
        out.append(("image_size", {"min_side": a.min_side, "max_aspect": a.max_aspect},
                    R.image_size(a.min_side, a.max_aspect)))
    if a.dedup_image:
        out.append(("exact_image", {}, D.exact("image")))
    if a.dedup_pair:
        out.append(("exact_pair", {}, D.exact("pair")))
    if a.min_score is not None or a.top_fraction is not None:
        if a.min_score is not None and a.top_fraction is not None:
            raise CurateError("give --min-score or --top-fraction, not both")
        if a.top_fraction is not None and not 0 < a.top_fraction <= 1:
            raise CurateError("--top-fraction must be within (0, 1]")
        out.append(("clip_score", {"min": a.min_score, "top_fraction": a.top_fraction},
                    R.clip_score(a.min_score, a.top_fraction)))
    if a.semdedup_eps is not None:
        out.append(("semdedup", {"eps": a.semdedup_eps, "clusters": a.semdedup_clusters},
                    D.semdedup(a.semdedup_eps, a.semdedup_clusters, seed=a.seed)))
    if a.balance:
        out.append(("balance", {"entries": a.balance, "t": a.balance_t},
                    B.balance(B.read_entries(a.balance), a.balance_t, seed=a.seed)))
    return out


def run_rules(t: Table, rules) -> tuple[np.ndarray, list[dict]]:
    """-> (reason per row, "" when kept; counts per rule: removed in order and alone)."""
    reason = np.full(len(t), "", dtype=object)
    reason[~t.valid] = "unreadable"
    alive = t.valid.copy()
    counts = [{"rule": "unreadable", "params": {}, "removed": int((~t.valid).sum()), "alone": int((~t.valid).sum())}]
    for name, params, rule in rules:
        first = np.array_equal(alive, t.valid)   # nothing removed yet: "alone" is this very run
        gone = rule(t, alive.copy()) & alive
        alone = int(gone.sum()) if first else int((rule(t, t.valid.copy()) & t.valid).sum())
        reason[gone] = name
        alive &= ~gone
        counts.append({"rule": name, "params": params, "removed": int(gone.sum()), "alone": alone})
    return reason, counts


def write_decisions(path: Path, t: Table, reason: np.ndarray) -> None:
    def write(f):
        f.write(b"shard\tkey\treason\n")
        for s, k, r in zip(t.shard, t.key, reason):
            f.write(f"{s}\t{k}\t{r}\n".encode("utf-8"))
    atomic_write(path, write)


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--embeddings", required=True, help="the --out folder of `vlp data embed`")
    p.add_argument("--out", required=True, help="folder for decisions.tsv and the report")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier decisions.tsv in --out")
    g = p.add_argument_group("captions")
    g.add_argument("--min-words", type=int, default=0)
    g.add_argument("--max-words", type=int)
    g.add_argument("--max-caption-repeats", type=int, help="drop captions seen more often (boilerplate)")
    g = p.add_argument_group("images")
    g.add_argument("--min-side", type=int, default=0, help="shorter image side in px")
    g.add_argument("--max-aspect", type=float, help="long side / short side")
    g = p.add_argument_group("CLIP score (image-text cosine of the embedding model)")
    g.add_argument("--min-score", type=float)
    g.add_argument("--top-fraction", type=float, help="keep this share of the pool, best first (DataComp: 0.3)")
    g = p.add_argument_group("duplicates")
    g.add_argument("--dedup-image", action="store_true", help="exact duplicate image bytes")
    g.add_argument("--dedup-pair", action="store_true", help="exact duplicate image bytes + caption")
    g.add_argument("--semdedup-eps", type=float, help="SemDeDup: near-duplicates at cosine > 1 - eps")
    g.add_argument("--semdedup-clusters", type=int, default=1000, help="k-means clusters (default 1000)")
    g = p.add_argument_group("MetaCLIP balancing")
    g.add_argument("--balance", metavar="ENTRIES", help="UTF-8 file, one entry per line")
    g.add_argument("--balance-t", type=int, default=20000, help="at most t pairs per entry (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: one process holds the pool (~5 GB per million samples at D=512); "
                        "ray: Ray Data steps over a cluster (pip install 'vlp[ray]')")
    p.add_argument("--address", help="--engine ray: the cluster (HOST:PORT or auto; default: a local Ray)")
    p.add_argument("--no-sheets", action="store_true", help="skip the contact sheets of removed samples")
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        if (out / "decisions.tsv").is_file() and not a.overwrite:
            raise CurateError(f"{out} already holds decisions.tsv (use --overwrite or another --out)")
        rules = build_rules(a)
        if a.engine == "ray":
            summary = _on_ray(a, out, rules)
        else:
            t = load_tables(a.embeddings)
            reason, counts = run_rules(t, rules)
            write_decisions(out / "decisions.tsv", t, reason)
            summary = summarise(t, reason, counts, seed=a.seed)
    except CurateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_report(out, summary, sheets=not a.no_sheets))
    return 0


def _on_ray(a, out: Path, rules):
    try:
        from vlp.curate.ray_filter import filter_on_ray
    except ImportError as e:
        raise CurateError(f"--engine ray needs Ray Data: pip install 'vlp[ray]' ({e})") from None
    return filter_on_ray(a.embeddings, out, rules, address=a.address, seed=a.seed,
                         log=lambda m: print(m, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
