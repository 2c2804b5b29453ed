"""Duplicate rules: exact copies by hash, and SemDeDup's semantic near-duplicates (faiss k-means).

Within each group of duplicates the pair with the highest CLIP score stays (ties: the first in table order).
SemDeDup (Abbas et al. 2023): k-means on the normalised image embeddings; inside each cluster, with the
members ordered best score first, a member is removed when its cosine to any member before it exceeds
1 - eps. k-means trains on a sample (about 256 rows per centroid, faiss's own cap, chosen by a hash of each
row's pool position, in pool order) and every row is then assigned to its nearest centroid in float64: the
steps the Ray engine distributes (`vlp.curate.ray_rules`), so both engines decide the same. Pairs in different clusters are never compared: that is what makes it linear in the pool size,
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


PER_CENTROID = 256   # faiss.Kmeans' max_points_per_centroid: the sample k-means trains on


def mix64(order: np.ndarray, seed: int = 0) -> np.ndarray:
    """splitmix64 of each pool position: a seeded hash that picks samples the same way on every engine."""
    z = np.asarray(order, dtype=np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def in_sample(order: np.ndarray, n_alive: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Whether each row trains k-means: about clusters * 256 of the `n_alive` rows, by hash."""
    p = min(1.0, clusters * PER_CENTROID / max(n_alive, 1))
    return mix64(order, seed) <= np.uint64(min(int(p * 2.0**64), 2**64 - 1))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (each row alone, so any batching gives the same values)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x))[:, None], 1e-12)


def train_centroids(sample: np.ndarray, clusters: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """faiss spherical k-means on `sample` (unit rows, in pool order) -> centroids [k, D]."""
    import faiss

    k = max(1, min(clusters, len(sample)))
    km = faiss.Kmeans(sample.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(np.ascontiguousarray(sample))
    return km.centroids.copy()


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row, in float64 (a batch's shape cannot change a row's answer)."""
    return np.argmax(x.astype(np.float64) @ centroids.astype(np.float64).T, axis=1)


def kmeans_assign(x: np.ndarray, clusters: int, niter: int = 20, seed: int = 0,
                  order: np.ndarray = None) -> np.ndarray:
    """Cluster of each row of `x` (unit rows): k-means on the hash-picked sample of `order` (default: row
    index), taken in pool order, then every row assigned."""
    order = np.arange(len(x), dtype=np.int64) if order is None else order
    pick = np.flatnonzero(in_sample(order, len(x), clusters, seed))
    pick = pick[np.argsort(order[pick], kind="stable")]
    return assign(x, train_centroids(x[pick], clusters, niter, seed))


def remove_in_cluster(x: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
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
        x = unit_rows(t.image[order])
        cluster = kmeans_assign(x, clusters, niter, seed, order=t.order[order])
        by_cluster = np.argsort(cluster, kind="stable")    # stable: still best-first inside each cluster
        for rows in np.split(by_cluster, np.flatnonzero(np.diff(cluster[by_cluster])) + 1):
            if len(rows) > 1:
                bad[order[rows[remove_in_cluster(x[rows], 1.0 - eps)]]] = True
        return bad
    return rule
