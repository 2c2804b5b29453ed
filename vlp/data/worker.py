"""What each DataLoader worker runs (`WorkerStream`): read its range of the epoch's shards -> shuffle ->
decode/augment + caption -> batches, each carrying the worker's `Cursor`. See `vlp.data.pipeline` for the plan
and the guarantees."""
from __future__ import annotations

import gc
import random
from collections import Counter
from typing import Callable, Iterator, Optional, Protocol

from torch.utils.data import IterableDataset, get_worker_info

from vlp.config import DataConfig
from vlp.data import errors as E
from vlp.data.captions import CaptionPicker
from vlp.data.errors import DataError, SkipSample
from vlp.data.images import IMAGE_EXTS
from vlp.data.oddities import aspect_note, cut_caption
from vlp.data.plan import Cursor, EpochPlan, check_bad_fraction, mix, pool_slice, shuffle, slot_span, stream_seed
from vlp.data.shards import ShardSet
from vlp.data.tario import Sample, TarError, read_shard

class StreamSource(Protocol):
    """What a WorkerStream reads its set-up from (the training loader, `vlp.data.pipeline.TrainLoader`): named
    here so that the worker does not import the loader that imports it."""

    shards: ShardSet
    cfg: DataConfig
    rank: int
    world_size: int
    seed: int
    n_workers: int
    transform: Callable
    tokenizer: Callable
    picker: CaptionPicker

    def plan(self, epoch: int) -> EpochPlan: ...


class WorkerStream(IterableDataset):
    """What each DataLoader worker runs: read its range -> shuffle -> decode/augment + caption -> batch.
    `epoch`, `cursors` (resume) and `rotation` are set by TrainLoader before each epoch."""

    def __init__(self, loader: StreamSource):
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
        self._notes: list[tuple[str, str]] = []   # (key, warning line), sent with a batch; printed once per key
        self._retries = 0      # remote reads reopened after a transport error
        self._lost = 0         # samples of this pass's range that the shards do not hold or could not deliver
        self._quota = 0        # batches this worker owes in this epoch (lowered by the losses of its range)
        self._produced = -1    # batches made so far (-1 while replaying to a saved position: every pass is read)

    # ---- stage: read a range of the epoch's concatenated shards -------------------------------
    def _read(self, si: int, pieces: list[tuple[int, int]], count: bool) -> Iterator[Sample]:
        """Samples of shard `si` in the sorted ranges `pieces` (one open for them all; one range but for a
        re-planned epoch); losses counted when `count`. A range that reaches the shard's recorded end reads on to
        the real end, so that a size file that lies (either way) is noticed and counted."""
        url, n = self.shards.urls[si], self.shards.sizes[si]
        a, b = pieces[0][0], pieces[-1][1]
        to_end = b >= n
        reader = self._reader(url, a, None if to_end else b)
        wanted = (lambda i: i < b) if len(pieces) == 1 else _member(pieces)
        delivered = 0
        try:
            for s in reader:
                if wanted(s.index):
                    delivered += 1
                    yield s
        except TarError as e:
            if e.next_index < b:   # lost, not made up by repeating others (read the same way on a replay)
                lost = _from(pieces, e.next_index)
                self._lost += lost
                if count:
                    reason = E.TAR_REASONS.get(e.kind, E.BAD_TAR)
                    self._counts[reason] += lost
                    self._notes.append((f"{url} {e.kind}", f"warning: {e}; {lost} samples counted as {reason}"))
            return
        finally:
            self._retries += reader.retried
        held = reader.count or 0
        if held < b:   # the shard ended before the range did: the rest are phantoms (read the same way on a replay)
            self._lost += _from(pieces, held)
        if count:
            off = (_from(pieces, 0) - delivered) + (held - b if to_end and held > b else 0)
            if off:
                self._counts[E.SIZE_MISMATCH] += off
                self._notes.append(self._size_note(url, n, held))

    def _range(self, plan: EpochPlan, start: int, end: int, count: bool) -> Iterator[Sample]:
        """The samples at pool positions [start, end) of the epoch's concatenated shards, in stream order."""
        spans = pool_slice(plan.pool, start, end)
        cum, k = 0, 0
        for si in plan.order:
            n = self.shards.sizes[si]
            pieces = []
            while k < len(spans) and spans[k][0] < cum + n:
                a, b = spans[k]
                pieces.append((max(a - cum, 0), min(b - cum, n)))
                if b > cum + n:
                    break   # the span goes on into the next shard
                k += 1
            if pieces:
                yield from self._read(si, pieces, count)
            cum += n
            if k >= len(spans):
                break

    def _resampled(self, rng: random.Random) -> Iterator[Sample]:
        weights = self.shards.draw_weights()
        ids = list(range(len(self.shards.urls)))
        empty = 0
        while True:
            si = rng.choices(ids, weights=weights, k=1)[0]
            url, got = self.shards.urls[si], 0
            reader = self._reader(url, 0, None)
            try:
                for s in reader:
                    got += 1
                    yield s
            except TarError as e:
                reason = E.TAR_REASONS.get(e.kind, E.BAD_TAR)
                self._counts[reason] += max(self.shards.sizes[si] - e.next_index, 1)
                self._notes.append((f"{url} {e.kind}", f"warning: {e}; counted as {reason}"))
            else:
                if reader.count != self.shards.sizes[si]:
                    self._notes.append(self._size_note(url, self.shards.sizes[si], reader.count or 0))
            finally:
                self._retries += reader.retried
            empty = 0 if got else empty + 1
            if empty > 2 * len(ids) + 8:
                raise DataError(f"no readable samples in {empty} shards drawn in a row (e.g. {url})")

    def _stream(self, plan: EpochPlan, w: int) -> Iterator[tuple[Sample, int]]:
        """The worker's raw samples (with their pass number) in post-shuffle order: the positions a Cursor counts."""
        base = (self.seed, self.epoch, self.rank, w, plan.gen)
        if plan.order is None:
            rng = random.Random(stream_seed(*base, 1))
            items = ((s, 0) for s in self._resampled(rng))
            yield from shuffle(items, self.cfg.shuffle_buffer, random.Random(stream_seed(*base, 2)))
            return
        B = self.batch
        lo, hi = slot_span(plan, self.rank, w, B)
        pass_no = 0
        while True:
            self._pass_good, self._lost = 0, 0
            items = ((s, pass_no) for s in self._range(plan, lo, hi, count=pass_no == 0))
            yield from shuffle(items, self.cfg.shuffle_buffer, random.Random(stream_seed(*base, 3, pass_no)))
            if pass_no == 0 and self._lost:   # owe only what the range really delivers: a lost sample is not
                # made up by repeating others (issue 22.11: a truncated shard had 50 of 592 samples trained twice)
                self._quota = max(0, min(self._quota, (plan.quotas[w] * B - self._lost) // B))
                if self._quota == 0:
                    return
            if self._produced >= self._quota:   # owed batches all made: no further pass (nor its reads)
                return
            # Topping up for unusable samples (corrupt images, ...): from the worker's own share again.
            if self._pass_good == 0:
                raise DataError(f"no readable samples in this worker's share of epoch {self.epoch} "
                                f"(shards {self.shards.urls[plan.order[0]]} ...); skipped: {dict(self._counts)}")
            pass_no += 1

    def _reader(self, url: str, start: int, stop: Optional[int]):
        return read_shard(url, start, stop, self.exts, retries=self.cfg.shard_retries,
                          timeout=getattr(self.cfg, "shard_timeout", None))

    @staticmethod
    def _size_note(url: str, claimed: int, held: int) -> tuple[str, str]:
        return (f"{url} size", f"warning: {url}: the size file says {claimed} samples, the shard holds {held} "
                               f"(counted as {E.SIZE_MISMATCH}; fix sizes.json)")

    # ---- stage: decode/augment + caption ------------------------------------------------------
    def _sample(self, s: Sample, rng: random.Random):
        img = s.image
        if img is None:
            raise SkipSample(E.MISSING_IMAGE)
        text, cut = cut_caption(self.picker(s.files, rng), s.key)
        x = self.transform(img, rng)
        for note in (cut, aspect_note(getattr(self.transform, "last_size", None), s.key)):
            if note:
                self._notes.append(note)
        return x, text

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
        self._quota = plan.quotas[w]   # `_stream` lowers it once it knows the losses of this worker's range
        cur = self.cursors.get(w) or Cursor(w)
        if cur.produced >= self._quota:
            return
        self._counts, self._retries = Counter(), 0
        B = self.batch
        imgs, texts = [], []
        stream = self._stream(plan, w)
        pos, produced, good = 0, cur.produced, cur.good
        self._produced = -1
        if cur.pos:
            for _ in range(cur.pos):
                self._pass_good = 1   # replay: nothing is decoded; a pass is never judged empty
                if next(stream, None) is None:
                    raise DataError("loader state does not match the data (stream ended before the saved position)")
            pos = cur.pos
            # replaying re-counted the shard-level losses and retries up to this point; the saved counters are exact
            self._counts, self._retries = Counter(cur.counts), cur.retries
        self._produced = produced
        for s, pass_no in stream:
            if pass_no and produced >= self._quota:   # a top-up pass is never drawn for lost samples
                break
            pos += 1
            rng = random.Random(mix(self.seed, self.epoch, self.rank, w, pos, 4))
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
                produced = self._produced = produced + 1
                batch = (self.transform.finish(imgs), self.tokenizer(texts),
                         Cursor(w, pos, produced, good, dict(self._counts), self._retries), self._notes)
                imgs, texts, self._notes = [], [], []
                yield batch
                if produced >= self._quota:
                    break
        if produced < plan.quotas[w]:   # ended early (lost samples): an empty marker brings its Cursor (counts) home
            yield None, None, Cursor(w, pos, produced, good, dict(self._counts), self._retries), self._notes



def _from(pieces: list[tuple[int, int]], i: int) -> int:
    """How many of the indices in `pieces` are >= i (the samples a shard that stops at i loses)."""
    return sum(b - max(a, i) for a, b in pieces if b > i)


def _member(pieces: list[tuple[int, int]]) -> Callable[[int], bool]:
    """Whether an index lies in the sorted ranges `pieces` (the reader yields indices in increasing order)."""
    state = {"k": 0}

    def inside(i: int) -> bool:
        k = state["k"]
        while k < len(pieces) and pieces[k][1] <= i:
            k += 1
        state["k"] = k
        return k < len(pieces) and pieces[k][0] <= i
    return inside
