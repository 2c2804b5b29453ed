"""Each curation rule as a distributed step over a Ray Dataset of the pool's small columns (no embeddings).

A step takes the state (one row per sample: `order`, `shard`, `key`, `caption`, `width`, `height`,
`image_hash`, `valid`, `score`, `reason` and `alive`, the rows the rule may remove) and returns it with a
bool column `hit`. The single-process rule functions do the deciding everywhere a rule's decision needs only
some rows together, so both engines decide alike:
  per-sample rules (caption words, image size, a CLIP-score threshold)  a batch map of the rule itself;
  caption repeats, exact duplicates   rows hash-partitioned on the normalised caption / image hash (+ caption),
                                      each partition (all copies of its keys, in pool order) given to the rule;
  CLIP-score top fraction             an exact global quantile: two 65,536-bin histograms of the scores'
                                      ordered bits, then the tied rows at the threshold by pool order;
  SemDeDup                            the alive rows' embeddings read per shard table, k-means on the
                                      hash-picked sample (driver), assignment as a map, the within-cluster
                                      pass grouped by cluster;
  MetaCLIP balancing                  caption matching as a map; the cap over the matched rows on the driver.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vlp.curate import balance as B
from vlp.curate import dedup as D
from vlp.curate.rules import normalise_caption

ROWS_PER_PARTITION = 100_000   # rows one group task holds at most: its memory (~4 KB a row as Python objects)


class BatchTable:
    """A batch of state rows seen as a `vlp.curate.store.Table` by the single-process rule functions."""

    def __init__(self, b: dict):
        self.__dict__.update(b)

    def __len__(self) -> int:
        return len(self.order)


def by_order(b: dict) -> dict:
    i = np.argsort(b["order"], kind="stable")
    return {k: v[i] for k, v in b.items()}


def with_hit(b: dict, hit) -> dict:
    return {**b, "hit": np.asarray(hit, dtype=bool) & b["alive"]}


def tally(ds, fn, combine=np.add) -> np.ndarray:
    """`fn(batch)` (a number or an array) combined over the pool (summed by default), computed where the
    blocks are; the driver sees one small array per block."""
    parts = ds.map_batches(lambda b: {"v": np.asarray(fn(b), dtype=np.float64)[None]}, batch_format="numpy")
    total = None
    for b in parts.iter_batches(batch_format="numpy", batch_size=None):
        s = combine.reduce(b["v"], axis=0)
        total = s if total is None else combine(total, s)
    return np.zeros(1) if total is None else np.atleast_1d(total)


def per_sample(ds, rule):
    return ds.map_batches(lambda b: with_hit(b, rule(BatchTable(b), b["alive"].copy())), batch_format="numpy")


def partitioned(ds, rule, key_of, n_rows: int):
    """Hash-partition the rows on `key_of(batch)`; the rule sees a whole partition at a time, in pool order."""
    import pandas as pd

    parts = max(1, -(-n_rows // ROWS_PER_PARTITION))

    def add_part(b):
        keys = np.array(key_of(b), dtype=object)   # a copy: the key may be a column of the state
        dead = np.flatnonzero(~b["alive"])             # spread over the partitions, not one "" key
        keys[dead] = [f"\x00{o}" for o in b["order"][dead]]
        return {**b, "part": (pd.util.hash_array(keys) % parts).astype(np.int64)}

    def decide(b):
        b = by_order({k: v for k, v in b.items() if k != "part"})
        return with_hit(b, rule(BatchTable(b), b["alive"].copy()))
    return ds.map_batches(add_part, batch_format="numpy").groupby("part", num_partitions=parts) \
        .map_groups(decide, batch_format="numpy")


def _ordered_bits(score: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (-0.0 as 0.0)."""
    u = (np.asarray(score, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(u >> 31, ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def top_fraction(ds, fraction: float):
    """Keep round(fraction * alive) rows, best score first, ties by pool order: as `rules.clip_score`."""
    n = int(tally(ds, lambda b: b["alive"].sum())[0])
    keep = int(round(fraction * n))
    if keep == 0:
        return ds.map_batches(lambda b: with_hit(b, True), batch_format="numpy")
    hi = tally(ds, lambda b: np.bincount(_ordered_bits(b["score"][b["alive"]]) >> 16, minlength=65536))
    above = np.cumsum(hi[::-1])                        # rows in this top bin or higher, from the top
    top = 65535 - int(np.searchsorted(above, keep))    # the bin holding the keep-th best row
    before = int(above[65535 - top - 1]) if top < 65535 else 0

    def low_bins(b):
        u = _ordered_bits(b["score"][b["alive"]])
        return np.bincount(u[(u >> 16) == top] & 0xFFFF, minlength=65536)
    lo = tally(ds, low_bins)
    above_lo = before + np.cumsum(lo[::-1])
    low = 65535 - int(np.searchsorted(above_lo, keep))
    t = np.uint32((top << 16) | low)
    n_better = int(above_lo[65535 - low - 1]) if low < 65535 else before
    ties = ds.map_batches(lambda b: {"order": b["order"][b["alive"] & (_ordered_bits(b["score"]) == t)]},
                          batch_format="numpy")
    tied = np.sort(np.concatenate([b["order"] for b in ties.iter_batches(batch_format="numpy", batch_size=None)]
                                  or [np.zeros(0, np.int64)]))
    last = tied[keep - n_better - 1]                   # the last tied row kept

    def decide(b):
        u = _ordered_bits(b["score"])
        return with_hit(b, ~((u > t) | ((u == t) & (b["order"] <= last))))
    return ds.map_batches(decide, batch_format="numpy")


def semdedup(ds, files: list[Path], eps: float, clusters: int, seed: int, n_rows: int, log):
    """SemDeDup as `dedup.semdedup` decides it, with the embeddings read per shard table where they lie."""
    import ray

    alive = ds.map_batches(lambda b: {"order": b["order"][b["alive"]], "score": b["score"][b["alive"]]},
                           batch_format="numpy")
    n = int(tally(alive, lambda b: len(b["order"]))[0])
    if n < 2:
        return ds.map_batches(lambda b: with_hit(b, False), batch_format="numpy")
    by_file = alive.map_batches(lambda b: {**b, "file": b["order"] >> 32}, batch_format="numpy") \
        .groupby("file").map_groups(_pack_file, batch_format="numpy")
    paths = {int(p.stem): str(p) for p in files}
    emb = by_file.map_batches(lambda b: _read_images(b, paths), batch_format="numpy", batch_size=1).materialize()
    sample = emb.map_batches(lambda b: _pick(b, D.in_sample(b["order"], n, clusters, seed)), batch_format="numpy")
    s = by_order({k: np.concatenate(v) for k, v in _columns(sample).items()})
    log(f"[ray] semdedup: k-means on a sample of {len(s['order'])} of {n} rows")
    centroids = ray.put(D.train_centroids(s["image"], clusters, seed=seed))
    assigned = emb.map_batches(lambda b: {**b, "cluster": D.assign(b["image"], ray.get(centroids))},
                               batch_format="numpy")

    def within(b):
        i = np.lexsort((b["order"], -b["score"]))      # best first, ties by pool order
        return {"order": b["order"][i][D.remove_in_cluster(b["image"][i], 1.0 - eps)]}
    gone = assigned.groupby("cluster").map_groups(within, batch_format="numpy")
    removed = np.sort(np.concatenate(_columns(gone).get("order") or [np.zeros(0, np.int64)]))
    ref = ray.put(removed)
    return ds.map_batches(lambda b: with_hit(b, np.isin(b["order"], ray.get(ref))), batch_format="numpy")


def _pack_file(b: dict) -> dict:
    i = np.argsort(b["order"])
    return {"file": b["file"][:1], "order": [b["order"][i].tobytes()], "score": [b["score"][i].tobytes()]}


def _read_images(b: dict, paths: dict) -> dict:
    import pyarrow.parquet as pq

    from vlp.curate.arrow_table import vectors

    order = np.frombuffer(b["order"][0], dtype=np.int64)
    score = np.frombuffer(b["score"][0], dtype=np.float32)
    table = pq.read_table(paths[int(b["file"][0])], columns=["image"])
    x = D.unit_rows(vectors(table.column("image"))[(order & 0xFFFFFFFF).astype(np.int64)])
    return {"order": order, "score": score, "image": x}


def _pick(b: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in b.items()}


def _columns(ds) -> dict:
    out: dict = {}
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k, v in b.items():
            out.setdefault(k, []).append(v)
    return out


def balance(ds, entries: list[str], t: int, seed: int):
    """MetaCLIP's cap as `balance.balance` decides it: matching as a map, then `balance.cap` on the driver
    over the matched rows only (their pool position and entry ids)."""
    import ray

    def matches(b):
        rows = b["order"][b["alive"]]
        found = B.match(b["caption"][b["alive"]], entries)
        return {"order": np.repeat(rows, [len(m) for m in found]),
                "entry": np.array([e for m in found for e in m], dtype=np.int64)}
    pairs = _columns(ds.map_batches(matches, batch_format="numpy"))
    order = np.concatenate(pairs.get("order") or [np.zeros(0, np.int64)])
    entry = np.concatenate(pairs.get("entry") or [np.zeros(0, np.int64)])
    i = np.lexsort((entry, order))
    order, entry = order[i], entry[i]
    rows, start = np.unique(order, return_index=True)
    matched = [e.tolist() for e in np.split(entry, start[1:])] if len(rows) else []
    kept = ray.put(B.cap(rows, matched, len(entries), t, seed))
    return ds.map_batches(lambda b: with_hit(b, ~np.isin(b["order"], ray.get(kept))), batch_format="numpy")


def caption_key(b: dict) -> list:
    return [normalise_caption(c) for c in b["caption"]]


def image_key(b: dict):
    return b["image_hash"]


def pair_key(b: dict):
    return np.asarray(b["image_hash"], dtype=object) + "\t" + np.asarray(b["caption"], dtype=object)
