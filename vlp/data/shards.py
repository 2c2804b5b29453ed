"""Shard specs as open_clip users write them, and how many samples each shard holds.

    /data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar

* brace expansion (`braceexpand`), sources joined by `::`;
* per-source weights (`--train-data-upsampling-factors 1::0.5`, open_clip's meaning: an upsampling
  factor per source). In resampled mode a shard is drawn with probability proportional to
  `weight * shard size`; in epoch mode a source contributes each of its shards `floor(weight)` times
  plus a seeded random `frac(weight)` share of its shards, chosen afresh every epoch;
* sample counts per shard, first found of: `sizes.json` next to the shard (open_clip's
  `{shard file name: n}`, also what `data_tools.make_shards` writes), img2dataset's
  `{shard stem}_stats.json` (`successes`), else counted by reading the tar headers.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from braceexpand import braceexpand

from vlp.data.errors import DataError
from vlp.data.tario import TarError, count_samples


def expand_spec(spec: str) -> list[list[str]]:
    """'a/{0..1}.tar::b/x.tar' -> [['a/0.tar', 'a/1.tar'], ['b/x.tar']]."""
    if not spec or not spec.strip():
        raise DataError("--train-data is empty")
    sources = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise DataError(f"empty source in shard spec {spec!r}")
        urls = list(braceexpand(part))
        sources.append(urls)
    return sources


def parse_weights(weights: Optional[str], n_sources: int) -> list[float]:
    if weights is None or weights == "":
        return [1.0] * n_sources
    parts = [w for w in str(weights).split("::")]
    if len(parts) != n_sources:
        raise DataError(f"--train-data-upsampling-factors has {len(parts)} values for {n_sources} sources")
    try:
        out = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"--train-data-upsampling-factors must be numbers joined by '::' (got {weights!r})") from None
    if any(w < 0 for w in out) or not any(w > 0 for w in out):
        raise DataError("--train-data-upsampling-factors must be >= 0 with at least one > 0")
    return out


@lru_cache(maxsize=256)
def _sizes_file(directory: str, mtime: float) -> dict:
    with open(os.path.join(directory, "sizes.json")) as fh:
        return json.load(fh)


def _sizes_json(directory: str) -> Optional[dict]:
    p = os.path.join(directory, "sizes.json")
    try:
        return _sizes_file(directory, os.path.getmtime(p))
    except (OSError, ValueError):
        return None


def shard_size(url: str) -> Optional[int]:
    """Sample count of one shard from its size files, or None if none records it."""
    d, name = os.path.split(url)
    sizes = _sizes_json(d or ".")
    if sizes is not None and name in sizes:
        return int(sizes[name])
    stem = name[:-4] if name.endswith(".tar") else name
    try:
        with open(os.path.join(d, f"{stem}_stats.json")) as fh:
            return int(json.load(fh)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class ShardSet:
    urls: list[str]
    sizes: list[int]                 # known or counted; 0 for a shard that is missing and unrecorded
    source: list[int]                # source index of each url
    weights: list[float]             # per source
    missing: list[str] = field(default_factory=list)  # shards absent at build time

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """Shard indices of one epoch (weights applied), shuffled reproducibly from (seed, epoch)."""
        rng = random.Random(f"vlp-shards-{seed}-{epoch}")
        order: list[int] = []
        for s, w in enumerate(self.weights):
            ids = [i for i, src in enumerate(self.source) if src == s]
            whole, frac = int(w), w - int(w)
            order += ids * whole
            k = round(frac * len(ids))
            if k:
                order += rng.sample(ids, k)
        rng.shuffle(order)
        return order

    def draw_weights(self) -> list[float]:
        """Per-shard probabilities (unnormalised) for resampled mode."""
        return [self.weights[s] * max(n, 1) for s, n in zip(self.source, self.sizes)]


def load_shards(spec: str, upsampling: Optional[str] = None, count_unknown: bool = True) -> ShardSet:
    sources = expand_spec(spec)
    weights = parse_weights(upsampling, len(sources))
    urls, sizes, src, missing = [], [], [], []
    for s, us in enumerate(sources):
        for u in us:
            n = shard_size(u)
            if not os.path.isfile(u):
                missing.append(u)
                n = n or 0
            elif n is None:
                if not count_unknown:
                    raise DataError(f"no sample count for {u}: add sizes.json or give --train-num-samples")
                try:
                    n = count_samples(u)
                except TarError as e:
                    n = max(e.next_index, 0)
            urls.append(u)
            sizes.append(int(n))
            src.append(s)
    if len(missing) == len(urls):
        raise DataError(f"no shard of --train-data exists (first: {urls[0]})")
    if sum(sizes) == 0:
        raise DataError(f"the shards of --train-data hold no samples (first: {urls[0]})")
    return ShardSet(urls, sizes, src, weights, missing)
