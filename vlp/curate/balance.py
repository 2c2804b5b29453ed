"""MetaCLIP balancing: match captions against a user's entry list, keep at most t pairs per entry.

MetaCLIP (Xu et al. 2023) matches entries as substrings of the caption and keeps each pair with probability
max over its entries of min(1, t / count): in expectation the tail is kept whole and the head cut to about t,
but a pair kept for a tail entry still counts for its head entries, which can end above t. Here the cap is
hard: entries are visited rarest first, and each one's pairs that are still undecided are taken in a seeded
random order and kept while every entry the pair matches has fewer than t kept pairs. So no entry ever
counts more than t kept pairs, tail entries are served first, and pairs matching no entry are removed.
Entries match whole words ("cat" matches "a cat on a mat", not "category"): captions and entries are
lower-cased and split into words, and every run of up to the longest entry's word count is looked up.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from vlp.curate.rules import Rule, normalise_caption
from vlp.curate.store import CurateError, Table


def read_entries(path: str) -> list[str]:
    """One entry per line (UTF-8); blank lines and repeats dropped."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise CurateError(f"cannot read the entry list {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[:e.start].count(b"\n") + 1
        raise CurateError(f"the entry list {path} is not UTF-8 (line {line}, byte {e.start}); "
                          f"save it as UTF-8") from None
    entries = list(dict.fromkeys(e for e in (normalise_caption(x) for x in text.splitlines()) if e))
    if not entries:
        raise CurateError(f"the entry list {path} holds no entries")
    return entries


def match(captions, entries: list[str]) -> list[list[int]]:
    """For each caption, the indices of the entries occurring in it as whole words."""
    index = {e: i for i, e in enumerate(entries)}
    longest = max(len(e.split()) for e in entries)
    out = []
    for c in captions:
        w = normalise_caption(c).split()
        found = {index[g] for n in range(1, longest + 1) for s in range(len(w) - n + 1)
                 if (g := " ".join(w[s:s + n])) in index}
        out.append(sorted(found))
    return out


def balance(entries: list[str], t: int, seed: int = 0) -> Rule:
    """Remove pairs that match no entry, and pairs beyond t per entry (rarest entries served first)."""
    if t < 1:
        raise CurateError("--balance-t must be at least 1")

    def rule(tab: Table, alive: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(alive)
        kept = cap(tab.order[idx], match(tab.caption[idx], entries), len(entries), t, seed)
        bad = alive.copy()
        bad[idx[np.isin(tab.order[idx], kept)]] = False
        return bad
    return rule


def cap(rows: np.ndarray, matched: list[list[int]], n_entries: int, t: int, seed: int = 0) -> np.ndarray:
    """The rows kept (pool positions, given in pool order with the entries each matches): entries rarest first,
    each one's undecided rows in a seeded random order, kept while all their entries hold fewer than t.
    Both engines call this with the same rows, so they keep the same pairs."""
    by_entry: dict[int, list[int]] = defaultdict(list)
    for row, ms in zip(rows.tolist(), matched):
        for m in ms:
            by_entry[m].append(row)
    rows_entries = dict(zip(rows.tolist(), matched))
    kept_count = np.zeros(n_entries, dtype=np.int64)
    decided: dict[int, bool] = {}
    rng = np.random.default_rng(seed)
    for e in sorted(by_entry, key=lambda e: (len(by_entry[e]), e)):
        todo = [r for r in by_entry[e] if r not in decided]
        for r in rng.permutation(np.array(todo, dtype=np.int64)) if todo else ():
            ms = rows_entries[int(r)]
            ok = all(kept_count[m] < t for m in ms)
            decided[int(r)] = ok
            if ok:
                kept_count[ms] += 1
    return np.array(sorted(r for r, ok in decided.items() if ok), dtype=np.int64)
