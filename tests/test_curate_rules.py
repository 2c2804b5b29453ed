"""Curation rules against brute-force counts, SemDeDup (real faiss) on planted near-duplicates, MetaCLIP's cap."""
from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from vlp.curate import balance as B
from vlp.curate import dedup as D
from vlp.curate import rules as R
from vlp.curate.filter import run_rules
from vlp.curate.store import CurateError, Table

WORDS = "red blue green cat dog house tree car sky sun moon star big small old new".split()


def make_table(n=400, d=32, seed=0, dup_of=None) -> Table:
    """Random captions, sizes, unit embeddings; `dup_of`: {row: source row} planted near-duplicate images."""
    rng = np.random.default_rng(seed)
    caps = [" ".join(rng.choice(WORDS, rng.integers(0, 8))) for _ in range(n)]
    for i in rng.choice(n, n // 10, replace=False):
        caps[i] = "click to enlarge"
    x = rng.normal(size=(n, d)).astype(np.float32)
    for j, i in (dup_of or {}).items():
        x[j] = x[i] + 0.05 * rng.normal(size=d) * np.linalg.norm(x[i]) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = np.array([f"h{v}" for v in rng.integers(0, n // 2, n)])   # plenty of exact repeats
    valid = rng.random(n) > 0.05
    return Table(shard=np.array(["s.tar"] * n, dtype=object), key=np.array([f"{i:06d}" for i in range(n)]),
                 caption=np.array(caps), width=rng.integers(20, 400, n).astype(np.int32),
                 height=rng.integers(20, 400, n).astype(np.int32), image_hash=hashes, valid=valid,
                 image=x.astype(np.float16), text=x.astype(np.float16),
                 score=np.where(valid, rng.random(n), np.nan).astype(np.float32))


def test_caption_and_image_rules_match_brute_force():
    t = make_table()
    alive = t.valid.copy()
    got = R.caption_words(2, 5)(t, alive)
    want = [a and not 2 <= len(c.split()) <= 5 for c, a in zip(t.caption, alive)]
    assert got.tolist() == want and 0 < sum(want) < len(t)

    got = R.caption_repeats(3)(t, alive)
    counts = Counter(c for c, a in zip(t.caption, alive) if a)
    assert got.tolist() == [a and counts[c] > 3 for c, a in zip(t.caption, alive)]
    assert got.sum() >= 30   # the planted boilerplate

    got = R.image_size(100, 2.0)(t, alive)
    want = [a and (min(w, h) < 100 or max(w, h) / min(w, h) > 2.0) for w, h, a in zip(t.width, t.height, alive)]
    assert got.tolist() == want


def test_clip_score_threshold_and_top_fraction():
    t = make_table()
    alive = t.valid.copy()
    assert R.clip_score(threshold=0.4)(t, alive).tolist() == [a and s < 0.4 for s, a in zip(t.score, alive)]
    bad = R.clip_score(top_fraction=0.3)(t, alive)
    kept = alive & ~bad
    assert kept.sum() == round(0.3 * alive.sum())
    assert t.score[kept].min() >= t.score[alive & bad].max()   # the best 30 %, exactly


def test_exact_duplicates_keep_one_per_hash_the_best_scored():
    t = make_table()
    alive = t.valid.copy()
    bad = D.exact("image")(t, alive)
    kept = alive & ~bad
    assert kept.sum() == len(set(t.image_hash[alive]))
    for h in set(t.image_hash[alive]):
        rows = np.flatnonzero(alive & (t.image_hash == h))
        assert (kept[rows].sum(), t.score[rows][kept[rows]][0]) == (1, t.score[rows].max())
    pair = D.exact("pair")(t, alive)
    assert (alive & ~pair).sum() == len({(h, c) for h, c, a in zip(t.image_hash, t.caption, alive) if a})


def brute_force_semdedup(t: Table, alive: np.ndarray, eps: float) -> np.ndarray:
    """SemDeDup without clusters: every pair compared (best score first)."""
    order = D._best_first(t, alive)
    x = t.image[order].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.zeros(len(t), dtype=bool)
    bad[order[D.remove_in_cluster(x, 1 - eps, block=7)]] = True
    return bad


def test_semdedup_finds_planted_near_duplicates():
    n = 2000
    rng = np.random.default_rng(1)
    copies = {int(j): int(i) for j, i in zip(rng.choice(np.arange(1000, n), 300, replace=False),
                                               rng.choice(1000, 300))}
    t = make_table(n=n, d=64, dup_of=copies)
    t.valid[:] = True
    t.score[:] = rng.random(n)
    alive = t.valid.copy()
    got = D.semdedup(eps=0.05, clusters=16)(t, alive)
    ref = brute_force_semdedup(t, alive, 0.05)
    groups: dict[int, list[int]] = {}   # a source and its copies: all but the best-scored are to go
    for j, i in copies.items():
        groups.setdefault(i, [i]).append(j)
    planted = np.zeros(n, dtype=bool)
    for g in groups.values():
        planted[sorted(g, key=lambda r: -t.score[r])[1:]] = True
    tp = (got & planted).sum()
    precision, recall = tp / got.sum(), tp / planted.sum()
    print(f"SemDeDup (16 clusters) on 300 planted copies in 2000: precision {precision:.3f}, recall {recall:.3f}; "
          f"brute force removes {ref.sum()}, clusters {got.sum()}")
    assert precision >= 0.99 and recall >= 0.95
    assert not (got & ~ref).any()   # clustering only ever misses pairs; it never invents one


def test_balance_never_exceeds_t_and_serves_rare_entries(tmp_path):
    t = make_table(n=600)
    entries = ["red", "cat", "big dog", "moon", "click"]
    f = tmp_path / "entries.txt"
    f.write_text("\n".join(entries + ["", "cat"]) + "\n", encoding="utf-8")
    assert B.read_entries(str(f)) == entries
    matches = B.match(t.caption, entries)
    assert matches[int(np.flatnonzero([c == "click to enlarge" for c in t.caption])[0])] == [4]
    assert all(("big dog" in c) == (2 in m) for c, m in zip(t.caption, matches))
    for cap in (1, 5, 20):
        alive = t.valid.copy()
        bad = B.balance(entries, cap, seed=3)(t, alive)
        kept = alive & ~bad
        per_entry = Counter(e for i in np.flatnonzero(kept) for e in matches[i])
        assert max(per_entry.values()) <= cap
        assert all(matches[i] for i in np.flatnonzero(kept))        # unmatched pairs are gone
        total = Counter(e for i in np.flatnonzero(alive) for e in matches[i])
        rarest = min(total, key=total.get)
        assert per_entry[rarest] == min(cap, total[rarest])         # the tail is served first


def test_balance_entry_list_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "entries.txt"
    f.write_bytes(b"cat\ndog\n\xff\xfe caf\xe9\n")
    with pytest.raises(CurateError, match=r"not UTF-8 \(line 3"):
        B.read_entries(str(f))


def test_run_rules_counts_in_order_and_alone():
    t = make_table()
    rules = [("caption_words", {}, R.caption_words(1)), ("exact_image", {}, D.exact("image")),
             ("clip_score", {}, R.clip_score(top_fraction=0.5))]
    reason, counts = run_rules(t, rules)
    by = {c["rule"]: c for c in counts}
    assert by["unreadable"]["removed"] == (~t.valid).sum()
    assert sum(c["removed"] for c in counts) == (reason != "").sum()
    assert by["exact_image"]["alone"] == D.exact("image")(t, t.valid.copy()).sum()
    assert by["exact_image"]["alone"] >= by["exact_image"]["removed"]
    alive = t.valid & ~R.caption_words(1)(t, t.valid.copy())
    alive &= ~D.exact("image")(t, alive.copy())
    assert by["clip_score"]["removed"] == alive.sum() - round(0.5 * alive.sum())
    assert not set(itertools.chain(reason)) - {"", "unreadable", "caption_words", "exact_image", "clip_score"}


def test_filter_cli_bad_entry_list_one_line(tmp_path):
    f = tmp_path / "e.txt"
    f.write_bytes(b"\xff\n")
    r = subprocess.run([sys.executable, "-m", "vlp", "data", "filter", "--embeddings", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o"), "--balance", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not UTF-8" in r.stderr, r.stderr
