"""The pieces of the training loader's bookkeeping that every stage shares: the epoch plan, a worker's exact
position (`Cursor`), the seeded mixing of (seed, epoch, rank, worker, position) into RNG seeds, the seeded
shuffle buffer and the bad-fraction check. Pure functions and plain data: no I/O, no torch."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

from vlp.data.errors import DataError

MIN_SEEN_FOR_ABORT = 256
_M64 = (1 << 64) - 1


def mix(*xs: int) -> int:
    """A 64-bit hash of small ints (splitmix64 chain); seeds the per-sample and per-stream RNGs."""
    h = 0x243F6A8885A308D3
    for x in xs:
        h = (h ^ (int(x) & _M64)) + 0x9E3779B97F4A7C15 & _M64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _M64
        h ^= h >> 31
    return h


@dataclass
class EpochPlan:
    order: Optional[list[int]]   # shard indices (epoch mode) or None (resampled)
    n_samples: int               # samples available this epoch (global)
    batches: int                 # per rank
    quotas: list[int]            # batches owed by each worker


@dataclass
class Cursor:
    """One worker's exact position in its epoch: samples taken from its post-shuffle stream, batches and usable
    samples produced, samples skipped by reason, remote reads retried. Carried with every batch; the last one per
    worker is the loader's state, and a worker given a Cursor replays its stream to `pos` without decoding, then
    continues."""

    worker: int
    pos: int = 0
    produced: int = 0
    good: int = 0
    counts: dict = field(default_factory=dict)
    retries: int = 0

    def to_list(self) -> list:
        return [int(self.worker), int(self.pos), int(self.produced), int(self.good),
                {str(k): int(v) for k, v in self.counts.items()}, int(self.retries)]

    @classmethod
    def from_list(cls, x: list) -> "Cursor":
        w, pos, produced, good, counts = x[:5]
        retries = int(x[5]) if len(x) > 5 else 0   # states saved before retries were counted have 5 fields
        return cls(int(w), int(pos), int(produced), int(good), {str(k): int(v) for k, v in counts.items()}, retries)


def shuffle(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Seeded buffer shuffle (webdataset-style: starts yielding at bufsize/10, grows to bufsize)."""
    if bufsize <= 1:
        yield from items
        return
    initial = max(1, bufsize // 10)
    buf: list = []
    end = object()
    it = iter(items)
    for x in it:
        buf.append(x)
        if len(buf) < bufsize:
            nxt = next(it, end)
            if nxt is not end:
                buf.append(nxt)
        if len(buf) >= initial:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def check_bad_fraction(counts: dict, good: int, limit: float, final: bool = False) -> None:
    """DataError when more than `limit` of the samples seen were skipped (checked from 256 seen, or at the end)."""
    bad = sum(counts.values())
    seen = good + bad
    if (final or seen >= MIN_SEEN_FOR_ABORT) and bad > limit * seen:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
        raise DataError(f"{bad} of {seen} samples were unreadable ({bad / max(seen, 1):.1%} > --max-bad-fraction "
                        f"{limit}): {detail}; check the shards with `vlp data inspect`")

