"""The training loader: shards -> (split, shuffle) -> samples -> (decode, augment, caption) -> batches.

Epoch mode (default). The epoch's shard list (weights applied) is shuffled from (seed, epoch), identically
on every rank, and read as one concatenated stream of `N` samples (sizes from the size files).
Each rank gets `nb = N // (batch_size * world_size)` batches; batch `i` of a rank comes from worker
`i % workers`, so worker `w` owes `ceil((nb - w) / workers)` batches. Every (rank, worker) slot is given a
contiguous, disjoint range of the stream holding exactly the samples it owes (a range may start or end
inside a shard: samples before the start are skipped undecoded, on a local file by seeking, on a stream
(pipe, HTTP, object store) by reading past them). So inside an epoch no sample is drawn twice, and fewer
than `batch_size * world_size` samples are left out (a different remainder every epoch, since the shard
order changes). Only when samples of a range are unreadable does its worker top up by drawing from its
own range again (a second pass, differently shuffled), or from the whole epoch when its range held no
sample at all, so that all ranks keep full, equal batches. Samples a size file claims but its shard does not
hold (phantoms) are not made up for: a worker whose range held `p` of them owes `(quota * B - p) // B` batches, and
a rank's epoch ends at the first batch its round-robin cannot take from the worker it is due from (batch `i` is
always worker `i % workers`'s, so the position stays exact). Ranks then differ in batches; the training loop ends
the epoch on all of them together (`vlp.train.feed`).

Resampled mode (`--dataset-resampled`). Each (rank, worker) draws shards with replacement from its own
seeded RNG, weighted by `upsampling factor * shard size`; an epoch is `--train-num-samples` samples.

Both modes shuffle samples through a seeded buffer (`--shuffle-buffer`). Every random choice (shard order,
buffer, crop, caption pick, text augmentation) derives from (seed, epoch, rank, worker, position), so
the batches are a function of (seed, epoch, rank, world_size, workers). Each batch carries its worker's
`Cursor` (position in its post-shuffle stream, batches, skip counters); `state_dict()` records the last
Cursor per worker, and `load_state_dict()` makes each worker replay its stream to that position without
decoding anything, then continue with the next unseen batch.

Unusable samples are skipped and counted by reason (`vlp.data.errors.REASONS`); when the skipped fraction
exceeds `--max-bad-fraction` (checked once 256 samples were seen, and at the end of an epoch) the loader
raises DataError. A size file that disagrees with its shard is counted (`size_mismatch`) and warned about
once per shard.
"""
from __future__ import annotations

import gc
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.config import DataConfig
from vlp.data import errors as E
from vlp.data.captions import CaptionPicker
from vlp.data.errors import DataError, SkipSample
from vlp.data.images import IMAGE_EXTS
from vlp.data.preflight import preflight
from vlp.data.shards import ShardSet, load_shards
from vlp.data.tario import Sample, TarError, read_shard
from vlp.data.transforms import build_transform
from vlp.train.preemption import start_workers, worker_init

MIN_SEEN_FOR_ABORT = 256
STATE_VERSION = 1
_M64 = (1 << 64) - 1


def _mix(*xs: int) -> int:
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
    samples produced, samples skipped by reason. Carried with every batch; the last one per worker is the
    loader's state, and a worker given a Cursor replays its stream to `pos` without decoding, then continues."""

    worker: int
    pos: int = 0
    produced: int = 0
    good: int = 0
    counts: dict = field(default_factory=dict)

    def to_list(self) -> list:
        return [int(self.worker), int(self.pos), int(self.produced), int(self.good),
                {str(k): int(v) for k, v in self.counts.items()}]

    @classmethod
    def from_list(cls, x: list) -> "Cursor":
        w, pos, produced, good, counts = x
        return cls(int(w), int(pos), int(produced), int(good), {str(k): int(v) for k, v in counts.items()})


def _shuffle(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
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


class _Stream(IterableDataset):
    """What each DataLoader worker runs: read its range -> shuffle -> decode/augment + caption -> batch.
    `epoch`, `cursors` (resume) and `rotation` are set by TrainLoader before each epoch."""

    def __init__(self, loader: "TrainLoader"):
        super().__init__()
        L = loader
        self.shards: ShardSet = L.shards
        self.cfg: DataConfig = L.cfg
        self.rank, self.world, self.seed = L.rank, L.world_size, L.seed
        self.n_workers = L.n_workers
        self.batch = L.cfg.batch_size
        self.transform = L.transform
        self.tokenizer = L.tokenizer
        self.picker: CaptionPicker = L.picker
        self.plan_fn: Callable[[int], EpochPlan] = L.plan
        self.exts = list(IMAGE_EXTS) + ["txt", "json"]
        self.epoch = 0
        self.cursors: dict[int, Cursor] = {}
        self.rotation = 0
        # per-iteration state
        self._counts: Counter = Counter()
        self._pass_good = 0
        self._size_notes: list[tuple[str, int, int]] = []   # (shard, size file's count, samples held), sent with a batch
        self._phantoms = 0     # samples of this pass's range that the size files claim but the shards do not hold
        self._quota = 0        # batches this worker owes in this epoch (lowered by the phantoms of its range)

    # ---- stage: read a range of the epoch's concatenated shards -------------------------------
    def _read(self, si: int, a: int, b: int, count: bool) -> Iterator[Sample]:
        """Samples [a, b) of shard `si`; losses counted when `count`. A range that reaches the shard's recorded end
        reads on to the real end, so that a size file that lies (either way) is noticed and counted."""
        url, n = self.shards.urls[si], self.shards.sizes[si]
        to_end = b >= n
        reader = read_shard(url, a, None if to_end else b, self.exts, retries=self.cfg.shard_retries)
        delivered = 0
        try:
            for s in reader:
                if s.index < b:
                    delivered += 1
                    yield s
        except TarError as e:
            if count and e.next_index < b:
                self._counts[E.TAR_REASONS.get(e.kind, E.BAD_TAR)] += b - max(e.next_index, a)
            return
        held = reader.count or 0
        if held < b:   # the shard ended before the range did: the rest are phantoms (read the same way on a replay)
            self._phantoms += b - max(held, a)
        if count:
            off = (b - a - delivered) + (held - b if to_end and held > b else 0)
            if off:
                self._counts[E.SIZE_MISMATCH] += off
                self._size_notes.append((url, n, held))

    def _range(self, plan: EpochPlan, start: int, end: int, count: bool) -> Iterator[Sample]:
        cum = 0
        for si in plan.order:
            n = self.shards.sizes[si]
            a, b = max(start - cum, 0), min(end - cum, n)
            if a < b:
                yield from self._read(si, a, b, count)
            cum += n
            if cum >= end:
                break

    def _resampled(self, rng: random.Random) -> Iterator[Sample]:
        weights = self.shards.draw_weights()
        ids = list(range(len(self.shards.urls)))
        empty = 0
        while True:
            si = rng.choices(ids, weights=weights, k=1)[0]
            url, got = self.shards.urls[si], 0
            reader = read_shard(url, 0, None, self.exts, retries=self.cfg.shard_retries)
            try:
                for s in reader:
                    got += 1
                    yield s
            except TarError as e:
                self._counts[E.TAR_REASONS.get(e.kind, E.BAD_TAR)] += max(self.shards.sizes[si] - e.next_index, 1)
            else:
                if reader.count != self.shards.sizes[si]:
                    self._size_notes.append((url, self.shards.sizes[si], reader.count or 0))
            empty = 0 if got else empty + 1
            if empty > 2 * len(ids) + 8:
                raise DataError(f"no readable samples in {empty} shards drawn in a row (e.g. {url})")

    def _stream(self, plan: EpochPlan, w: int) -> Iterator[tuple[Sample, int]]:
        """The worker's raw samples (with their pass number) in post-shuffle order: the positions a Cursor counts."""
        base = (self.seed, self.epoch, self.rank, w)
        if plan.order is None:
            rng = random.Random(_mix(*base, 1))
            items = ((s, 0) for s in self._resampled(rng))
            yield from _shuffle(items, self.cfg.shuffle_buffer, random.Random(_mix(*base, 2)))
            return
        B = self.batch
        lo = (self.rank * plan.batches + sum(plan.quotas[:w])) * B
        hi = lo + plan.quotas[w] * B
        pass_no, whole = 0, False
        while True:
            self._pass_good, self._phantoms, raw = 0, 0, [0]

            def numbered(it, p=pass_no):
                for s in it:
                    raw[0] += 1
                    yield s, p

            items = numbered(self._range(plan, lo, hi, count=pass_no == 0))
            yield from _shuffle(items, self.cfg.shuffle_buffer, random.Random(_mix(*base, 3, pass_no)))
            if pass_no == 0 and not whole and self._phantoms:   # owe only what the range really holds
                self._quota = max(0, min(self._quota, (plan.quotas[w] * B - self._phantoms) // B))
                if self._quota == 0:
                    return
            # Topping up: from the worker's own share again, or, when that held no sample at all (it lies in
            # a truncated or missing stretch), from the whole epoch. Decided on raw counts, which a replay sees too.
            if raw[0] == 0 and not whole:
                whole, lo, hi = True, 0, plan.n_samples
            elif self._pass_good == 0:
                where = "epoch" if whole else "this worker's share of epoch"
                raise DataError(f"no readable samples in {where} {self.epoch} "
                                f"(shards {self.shards.urls[plan.order[0]]} ...); skipped: {dict(self._counts)}")
            pass_no += 1

    # ---- stage: decode/augment + caption ------------------------------------------------------
    def _sample(self, s: Sample, rng: random.Random):
        img = s.image
        if img is None:
            raise SkipSample(E.MISSING_IMAGE)
        text = self.picker(s.files, rng)
        return self.transform(img, rng), text

    # ---- stage: batch -------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        # Everything alive now (the model; the tokenizer's vocabulary, merges and word cache: ~400k objects for
        # vlp-tiny) leaves the collector's reach. Otherwise each full collection walks them all (~0.7 s): on the
        # icon benchmark that was 10-14 ms of GC per batch of 128 over 60 batches, 0 after (benchmarks/loader_gc.py).
        gc.freeze()
        # DataLoader worker j yields first; it plays logical worker (j + rotation) % W, so that after a resume at
        # batch b the round-robin continues with batch b's worker (batch i always comes from worker i % W)
        w = ((info.id if info is not None else 0) + self.rotation) % self.n_workers
        plan = self.plan_fn(self.epoch)
        self._quota = plan.quotas[w]   # `_stream` lowers it once it knows the phantoms of this worker's range
        cur = self.cursors.get(w) or Cursor(w)
        if cur.produced >= self._quota:
            return
        self._counts = Counter()
        B = self.batch
        imgs, texts = [], []
        stream = self._stream(plan, w)
        pos, produced, good = 0, cur.produced, cur.good
        if cur.pos:
            for _ in range(cur.pos):
                self._pass_good = 1   # replay: nothing is decoded; a pass is never judged empty
                if next(stream, None) is None:
                    raise DataError("loader state does not match the data (stream ended before the saved position)")
            pos = cur.pos
            # replaying re-counted the shard-level losses up to this point; the saved counters are exact
            self._counts = Counter(cur.counts)
        for s, pass_no in stream:
            if pass_no and produced >= self._quota:   # a top-up pass is never drawn for phantoms
                break
            pos += 1
            rng = random.Random(_mix(self.seed, self.epoch, self.rank, w, pos, 4))
            try:
                img, text = self._sample(s, rng)
            except SkipSample as skip:
                if pass_no == 0:
                    self._counts[skip.reason] += 1
                    check_bad_fraction(self._counts, good, self.cfg.max_bad_fraction)
                continue
            imgs.append(img)
            texts.append(text)
            good += 1
            self._pass_good += 1
            if len(imgs) == B:
                produced += 1
                batch = (self.transform.finish(imgs), self.tokenizer(texts),
                         Cursor(w, pos, produced, good, dict(self._counts)), self._size_notes)
                imgs, texts, self._size_notes = [], [], []
                yield batch
                if produced >= self._quota:
                    break
        if produced < plan.quotas[w]:   # ended early (phantoms): an empty marker brings its Cursor (counts) home
            yield None, None, Cursor(w, pos, produced, good, dict(self._counts)), self._size_notes


class TrainLoader:
    """Iterate for one epoch of (images, texts) batches; see the module docstring for the guarantees."""

    def __init__(self, cfg: DataConfig, preprocess: Any, tokenizer: Callable, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shards: Optional[ShardSet] = None, device_normalize: bool = False):
        if not cfg.train_data:
            raise DataError("--train-data is required")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.tokenizer = tokenizer
        self.n_workers = max(1, cfg.workers)
        self.shards = shards or load_shards(cfg.train_data, cfg.train_data_upsampling_factors,
                                            retries=cfg.shard_retries)
        for line in preflight(self.shards, cfg, world_size):   # raises DataError when it cannot work
            if rank == 0:
                print(line, file=sys.stderr, flush=True)
        if cfg.dataset_resampled and not cfg.train_num_samples:
            cfg_n = self.shards.total
        else:
            cfg_n = cfg.train_num_samples
        self._resampled_n = cfg_n
        self.transform = build_transform(
            preprocess, rrc_scale=cfg.rrc_scale, strong=cfg.strong_views,
            strong_scale=getattr(cfg, "strong_rrc_scale", (0.08, 1.0)), fast=getattr(cfg, "fast_decode", True))
        self.picker = CaptionPicker(cfg.use_rewrites, cfg.rewrites_field, cfg.text_aug)
        # uint8 batches for the consumer to normalise on its device (see `normalization`), pinned when CUDA is there
        self.device_normalize = device_normalize and self.normalization is not None
        self._plans: dict[int, EpochPlan] = {}
        self._epoch = 0
        self._batches_done = 0
        self._cursors: dict[int, Cursor] = {}
        self._prev_counts: Counter = Counter()
        self._size_warned: set[str] = set()
        self.plan(0)  # fail early (too few samples for one global batch, ...)

    # ---- the epoch plan (pure function of the data, seed and epoch) ---------------------------
    def plan(self, epoch: int) -> EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        B, R, W = self.cfg.batch_size, self.world_size, self.n_workers
        if self.cfg.dataset_resampled:
            order, n = None, int(self._resampled_n)
        else:
            order = self.shards.epoch_order(self.seed, epoch)
            n = sum(self.shards.sizes[i] for i in order)
            if self.cfg.train_num_samples:
                n = min(n, int(self.cfg.train_num_samples))
        nb = n // (B * R)
        if nb < 1:
            raise DataError(f"epoch {epoch} has {n} samples, fewer than one global batch "
                            f"({B} x {R} ranks): lower --batch-size or add data")
        quotas = [(nb - w + W - 1) // W if nb > w else 0 for w in range(W)]
        p = EpochPlan(order, n, nb, quotas)
        self._plans = {epoch: p}
        return p

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in the current epoch."""
        return self.plan(self._epoch).batches

    @property
    def num_batches(self) -> int:
        return self.batches_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        """Samples drawn per epoch over all ranks (batches_per_epoch * batch_size * world_size)."""
        return self.batches_per_epoch * self.cfg.batch_size * self.world_size

    @property
    def normalization(self) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
        """(mean, std) per channel on the 0-1 scale, as torchvision's Normalize takes them: what the host path
        applies and a `device_normalize` consumer must apply to `images.float() / 255`. None when the model's
        preprocess is applied as is (its output is already normalised float)."""
        return getattr(self.transform, "normalization", None)

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws; a new epoch starts at its first batch."""
        if epoch != self._epoch:
            self._prev_counts += self._current_counts()
            self._epoch = epoch
            self._batches_done = 0
            self._cursors = {}

    # ---- counters -----------------------------------------------------------------------------
    def _current_counts(self) -> Counter:
        c: Counter = Counter()
        for cur in self._cursors.values():
            c.update(cur.counts)
        return c

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped by reason since the loader was built (or as restored from a checkpoint)."""
        c = self._prev_counts + self._current_counts()
        return {k: int(v) for k, v in sorted(c.items()) if v}

    # ---- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan(self._epoch)
        if self._batches_done >= plan.batches:
            return
        W = self.n_workers
        ds = _Stream(self)
        ds.epoch = self._epoch
        ds.rotation = self._batches_done % W
        for w in range(W):
            produced = len(range(w, self._batches_done, W))
            if produced and (w not in self._cursors or self._cursors[w].produced != produced):
                raise DataError("loader state is inconsistent with its batch count; cannot resume exactly")
        ds.cursors = dict(self._cursors)
        # Its own generator: a DataLoader iterator otherwise draws its base seed from torch's global RNG, so the
        # model's dropout masks after a resume would differ from the uninterrupted run's.
        gen = torch.Generator().manual_seed(_mix(self.seed, self._epoch, self.rank, 5) >> 1)
        dl = DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.cfg.workers, generator=gen,
                        persistent_workers=False, prefetch_factor=4 if self.cfg.workers > 0 else None,
                        pin_memory=self.device_normalize and torch.cuda.is_available(), worker_init_fn=worker_init)
        finish = (lambda x: x) if self.device_normalize else self.transform.normalize
        try:
            for images, texts, cur, size_notes in start_workers(dl):
                self._warn_sizes(size_notes)
                if cur.worker != self._batches_done % W:   # not the worker due: it has ended
                    break
                self._cursors[cur.worker] = cur
                if images is None:   # the worker due ended early (phantom samples): so does this rank's epoch
                    break
                self._batches_done += 1
                self._check_bad_fraction(final=self._batches_done >= plan.batches)
                yield finish(images), texts
            if self._batches_done < plan.batches:   # ended early: the epoch's final check
                self._check_bad_fraction(final=True)
        except DataError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            last = lines[-1] if lines else "data error"
            raise DataError(last.split("DataError: ", 1)[-1]) from None

    def _check_bad_fraction(self, final: bool) -> None:
        check_bad_fraction(self._current_counts(), sum(c.good for c in self._cursors.values()),
                           self.cfg.max_bad_fraction, final=final)

    def _warn_sizes(self, notes: list[tuple[str, int, int]]) -> None:
        """One stderr line per shard (per loader) whose size file differs from what it holds."""
        for url, claimed, held in notes:
            if url not in self._size_warned:
                self._size_warned.add(url)
                print(f"warning: {url}: the size file says {claimed} samples, the shard holds {held} "
                      f"(counted as {E.SIZE_MISMATCH}; fix sizes.json)", file=sys.stderr, flush=True)

    # ---- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "workers": self.n_workers, "batch_size": self.cfg.batch_size,
            "resampled": bool(self.cfg.dataset_resampled),
            "worker_state": [cur.to_list() for _, cur in sorted(self._cursors.items())],
            "prev_counts": {str(k): int(v) for k, v in self._prev_counts.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        if int(d.get("version", -1)) != STATE_VERSION:
            raise DataError(f"loader state version {d.get('version')} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("world_size", self.world_size), ("workers", self.n_workers),
                          ("batch_size", self.cfg.batch_size), ("resampled", bool(self.cfg.dataset_resampled)),
                          ("rank", self.rank)):
            if d.get(key) != mine:
                raise DataError(f"cannot resume the data loader exactly: saved with {key}={d.get(key)}, now {mine}")
        self._epoch = int(d["epoch"])
        self._batches_done = int(d["batches_done"])
        cursors = [Cursor.from_list(x) for x in d.get("worker_state", [])]
        self._cursors = {c.worker: c for c in cursors}
        self._prev_counts = Counter({k: int(v) for k, v in d.get("prev_counts", {}).items()})


def build_train_loader(cfg: DataConfig, preprocess: Any, tokenizer: Callable, *, rank: int = 0,
                       world_size: int = 1, seed: int = 0, device_normalize: bool = False) -> TrainLoader:
    """The training loader of the contract (docs/contracts.md). `device_normalize`: yield uint8 images (pinned
    when CUDA is available) for the consumer to normalise on its device with `loader.normalization`."""
    return TrainLoader(cfg, preprocess, tokenizer, rank=rank, world_size=world_size, seed=seed,
                       device_normalize=device_normalize)
