"""The pieces of the training loader's bookkeeping that every stage shares: the epoch plan, a worker's exact
position (`Cursor`), the seeded mixing of (seed, epoch, rank, worker, position) into RNG seeds, the seeded
shuffle buffer and the bad-fraction check. Pure functions and plain data: no I/O, no torch.

An epoch's samples are positions in its concatenated shard stream. Normally every position below
`batches * batch_size * world` is planned; after a resume on another number of ranks or workers the epoch's
`pool` holds only the positions the old ranks had not consumed (`vlp.data.replan`)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

from vlp.data import errors as E
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
    pool: Optional[list] = None  # [(start, end), ...] stream positions planned (None: all from 0); see replan
    gen: int = 0                 # how many re-plans led to this epoch's pool (mixed into its stream seeds)


def quotas_for(batches: int, workers: int) -> list[int]:
    """Batches each worker owes: batch i of a rank comes from worker i % workers."""
    return [(batches - w + workers - 1) // workers if batches > w else 0 for w in range(workers)]


def slot_span(plan: EpochPlan, rank: int, worker: int, batch: int) -> tuple[int, int]:
    """The pool positions [lo, hi) of one (rank, worker) slot: contiguous, disjoint, exactly what it owes."""
    lo = (rank * plan.batches + sum(plan.quotas[:worker])) * batch
    return lo, lo + plan.quotas[worker] * batch


def pool_slice(pool: Optional[list], lo: int, hi: int) -> list[tuple[int, int]]:
    """The stream positions at pool positions [lo, hi), as sorted intervals (pool None: the positions themselves)."""
    if pool is None:
        return [(lo, hi)] if lo < hi else []
    out, at = [], 0
    for a, b in pool:
        s, e = max(lo - at, 0), min(hi - at, b - a)
        if s < e:
            out.append((a + s, a + e))
        at += b - a
        if at >= hi:
            break
    return out


def stream_seed(seed: int, epoch: int, rank: int, worker: int, gen: int, *tail: int) -> int:
    """The seed of a (rank, worker) stream's RNGs; a re-planned epoch (gen > 0) draws apart from the first plan."""
    return mix(seed, epoch, rank, worker, *tail) if not gen else mix(seed, epoch, rank, worker, gen, *tail)


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



# ---- resume on another number of ranks or workers -----------------------------------------------
# samples a shard lost (a lying size file, a cut tar): the old streams held fewer items than replayed by position
SHARD_LOSSES = (E.SIZE_MISMATCH, E.BAD_TAR, E.TRUNCATED_TAR, E.MISSING_SHARD, E.UNREADABLE_SHARD)


def replan(old_states: list, rank: int, world: int, workers: int) -> dict:
    """The loader state of `rank` of `world` ranks with `workers` workers each, from the states every old rank
    saved in the same step (rank order). Same ranks and workers: the old rank's own state (bit-exact resume).
    Otherwise the interrupted epoch goes on exactly once: each old worker's consumed samples are the first
    `Cursor.pos` of its post-shuffle stream, found by replaying its seeded shuffle over positions (no reading);
    the positions no old worker consumed become the epoch's pool, planned over the new ranks and workers as an
    epoch is (fewer than batch_size * world of them may be left out, as an epoch's remainder is). Later epochs
    are planned for the new ranks from the start. Same answer on every new rank."""
    s0 = _agreeing(old_states)
    if len(old_states) == world and int(s0["workers"]) == workers:
        return old_states[rank]
    B, R, W = int(s0["batch_size"]), len(old_states), int(s0["workers"])
    epoch, seed, gen = int(s0["epoch"]), int(s0["seed"]), int(s0.get("gen", 0))
    if "epoch_batches" not in s0 or "shuffle_buffer" not in s0:
        raise DataError("the checkpoint's loader states predate re-planning (no epoch_batches/shuffle_buffer): "
                        f"resume it on {R} ranks with --workers {W}")
    old = EpochPlan(None, 0, int(s0["epoch_batches"]), quotas_for(int(s0["epoch_batches"]), W),
                    [tuple(x) for x in s0["pool"]] if s0.get("pool") is not None else None, gen)
    left: list[tuple[int, int]] = []   # stream positions no old worker took, as intervals
    done = 0
    for r, st in enumerate(old_states):
        cursors = {int(c[0]): int(c[1]) for c in st.get("worker_state", [])}
        done += int(st["batches_done"])
        for w in range(W):
            lo, hi = slot_span(old, r, w, B)
            taken = _first_out(hi - lo, cursors.get(w, 0), int(s0["shuffle_buffer"]),
                               stream_seed(seed, epoch, r, w, gen, 3, 0))
            for a, b in _gaps(sorted(taken), hi - lo):   # memory as consumed samples, not as the epoch
                left += pool_slice(old.pool, lo + a, lo + b)
    if s0.get("resampled"):   # drawn with replacement: only the number of samples still owed carries over
        left = [(0, max(0, (old.batches * R - done) * B))]
    pool = _merged(sorted(left))
    n_left = sum(b - a for a, b in pool)
    mine = [st for r, st in enumerate(old_states) if r % world == rank]
    counts: dict = {}
    for st in mine:
        for c in [st.get("prev_counts", {})] + [Cursor.from_list(x).counts for x in st.get("worker_state", [])]:
            for k, v in c.items():
                counts[str(k)] = counts.get(str(k), 0) + int(v)
    retries = sum(int(st.get("prev_retries", 0)) + sum(Cursor.from_list(x).retries for x in st.get("worker_state", []))
                  for st in mine)
    return {**{k: s0[k] for k in ("version", "seed", "batch_size", "resampled", "shards", "shuffle_buffer")},
            "epoch": epoch, "batches_done": 0, "rank": rank, "world_size": world, "workers": workers,
            "worker_state": [], "prev_counts": counts, "prev_retries": retries,
            "epoch_batches": n_left // (B * world), "pool": [list(x) for x in pool], "gen": gen + 1,
            "inexact": any(st.get("inexact") or _lost_any(st) for st in old_states)}


def _lost_any(st: dict) -> bool:
    """Whether a shard lost samples in this state's epoch: replaying its streams by position is then not exact."""
    return any(Cursor.from_list(x).counts.get(k) for x in st.get("worker_state", []) for k in SHARD_LOSSES)


def _agreeing(states: list) -> dict:
    """The first state, after checking that all were saved by one run at one step (one line otherwise)."""
    if not states:
        raise DataError("no loader states to resume from")
    for key in ("version", "epoch", "seed", "batch_size", "workers", "world_size", "shards", "resampled",
                "epoch_batches", "shuffle_buffer", "gen"):
        seen = {repr(st.get(key)) for st in states}
        if len(seen) > 1:
            raise DataError(f"the checkpoint's loader states disagree on {key} ({', '.join(sorted(seen))})")
    if [int(st["rank"]) for st in states] != list(range(len(states))) or int(states[0]["world_size"]) != len(states):
        raise DataError(f"the checkpoint holds {len(states)} loader states, not one per rank of its run in rank order")
    return states[0]


def _first_out(n: int, pos: int, bufsize: int, seed: int) -> list[int]:
    """Which of n items the worker's seeded shuffle (`shuffle`) had put out after `pos` were taken."""
    out = []
    if pos:
        for j in shuffle(iter(range(n)), bufsize, random.Random(seed)):
            out.append(j)
            if len(out) >= pos:
                break
    return out


def _gaps(taken: list[int], n: int) -> list[tuple[int, int]]:
    """The intervals of [0, n) outside the sorted positions `taken`."""
    out, at = [], 0
    for t in taken + [n]:
        if t > at:
            out.append((at, t))
        at = t + 1
    return out


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted intervals with the touching ones joined."""
    out: list = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif a < b:
            out.append((a, b))
    return out
