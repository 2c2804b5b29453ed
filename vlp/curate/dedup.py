"""Duplicate rules: exact copies by hash, and SemDeDup's semantic near-duplicates (faiss k-means).

Within each group of duplicates the pair with the highest CLIP score stays (ties: the first in table order).
SemDeDup (Abbas et al. 2023): k-means on the normalised image embeddings; inside each cluster, with the
members ordered best score first, a member is removed when its cosine to any member before it exceeds
1 - eps. Pairs in different clusters are never compared: that is what makes it linear in the pool size,
and what it can miss (tests/test_curate_dedup.py measures recall on planted copies against brute force).
"""
from __future__ import annotations

import numpy as np

from vlp.curate.rules import Rule
from vlp.curate.store import Table


def _best_first(t: Table, alive: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(alive)
    score = np.nan_to_num(t.score[idx], nan=-np.inf)
    return idx[np.argsort(-score, kind="stable")]


def exact(by: str = "image") -> Rule:
    """Exact duplicates: the same image bytes (`by="image"`), or the same image bytes and caption (`"pair"`)."""
    if by not in ("image", "pair"):
        raise ValueError(f"exact duplicates by 'image' or 'pair', not {by!r}")

    def rule(t: Table, alive: np.ndarray) -> np.ndarray:
        order = _best_first(t, alive)
        keys = t.image_hash[order].astype(object)
        if by == "pair":
            keys = keys + "\t" + t.caption[order].astype(object)
        _, first = np.unique(keys.astype(str), return_index=True)
        bad = np.zeros(len(t), dtype=bool)
        bad[order] = True
        bad[order[first]] = False
        return bad
    return rule


def kmeans_assign(x: np.ndarray, clusters: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """Cluster of each row of `x` (float32, L2-normalised) by faiss's spherical k-means."""
    import faiss

    k = max(1, min(clusters, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0]


def _remove_in_cluster(x: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
    """Rows j (in the given order) with cosine > threshold to some row i < j; blocks of columns bound memory."""
    out = np.zeros(len(x), dtype=bool)
    for a in range(1, len(x), block):
        b = min(len(x), a + block)
        sims = x[:b] @ x[a:b].T                           # [b, b - a]
        sims[np.arange(b)[:, None] >= np.arange(a, b)[None, :]] = -np.inf   # only earlier rows count
        out[a:b] = sims.max(axis=0) > threshold
    return out


def semdedup(eps: float, clusters: int = 1000, niter: int = 20, seed: int = 0) -> Rule:
    """SemDeDup near-duplicates at cosine > 1 - eps, within `clusters` k-means clusters of the image embeddings."""
    def rule(t: Table, alive: np.ndarray) -> np.ndarray:
        order = _best_first(t, alive)
        bad = np.zeros(len(t), dtype=bool)
        if len(order) < 2:
            return bad
        x = t.image[order].astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        assign = kmeans_assign(x, clusters, niter, seed)
        by_cluster = np.argsort(assign, kind="stable")    # stable: still best-first inside each cluster
        for rows in np.split(by_cluster, np.flatnonzero(np.diff(assign[by_cluster])) + 1):
            if len(rows) > 1:
                bad[order[rows[_remove_in_cluster(x[rows], 1.0 - eps)]]] = True
        return bad
    return rule
