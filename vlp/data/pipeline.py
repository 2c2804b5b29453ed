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

import sys
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from vlp.config import DataConfig
from vlp.data.captions import CaptionPicker
from vlp.data.errors import DataError
from vlp.data.oddities import counted_kind
from vlp.data.plan import Cursor, EpochPlan, check_bad_fraction, mix, quotas_for
from vlp.data.preflight import preflight
from vlp.data.shards import ShardSet, load_shards, shard_list_hash
from vlp.data.transforms import build_transform
from vlp.data.worker import WorkerStream
from vlp.runtime.preemption import start_workers, worker_init

STATE_VERSION = 1


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
                                            retries=cfg.shard_retries, timeout=cfg.shard_timeout)
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
        self._replanned: Optional[tuple] = None   # (epoch, pool, gen) of a resume on other ranks/workers
        self._inexact = False
        self._epoch = 0
        self._batches_done = 0
        self._cursors: dict[int, Cursor] = {}
        self._prev_counts: Counter = Counter()
        self._prev_retries = 0
        self._noted: Counter = Counter()   # counted notes by kind (vlp.data.oddities)
        # the shards pre-flight already named are not warned about again when a worker meets them
        self._warned: set[str] = {f"{u} missing" for u in self.shards.missing} | {
            f"{u} {kind}" for u in self.shards.unreadable for kind in ("bad_header", "unreadable")}
        self._shards_hash = shard_list_hash(self.shards)   # in every state (one per batch): computed once
        self.plan(0)  # fail early (too few samples for one global batch, ...)

    # ---- the epoch plan (pure function of the data, seed and epoch) ---------------------------
    def plan(self, epoch: int) -> EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        B, R, W = self.cfg.batch_size, self.world_size, self.n_workers
        _, pool, gen = self._replanned if self._replanned and self._replanned[0] == epoch else (epoch, None, 0)
        order = None if self.cfg.dataset_resampled else self.shards.epoch_order(self.seed, epoch)
        if pool is not None:   # the rest of an epoch begun on other ranks/workers (vlp.data.plan.replan)
            n = sum(b - a for a, b in pool)
        elif order is None:
            n = int(self._resampled_n)
        else:
            n = sum(self.shards.sizes[i] for i in order)
            if self.cfg.train_num_samples:
                n = min(n, int(self.cfg.train_num_samples))
        nb = n // (B * R)
        if nb < 1 and pool is None:
            raise DataError(f"epoch {epoch} has {n} samples, fewer than one global batch "
                            f"({B} x {R} ranks): lower --batch-size or add data")
        p = EpochPlan(order, n, nb, quotas_for(nb, W), pool, gen)
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
            self._prev_retries += sum(c.retries for c in self._cursors.values())
            self._epoch = epoch
            self._batches_done = 0
            self._cursors = {}
            if self._replanned and self._replanned[0] != epoch:
                self._replanned, self._plans = None, {}

    # ---- counters -----------------------------------------------------------------------------
    def _current_counts(self) -> Counter:
        c: Counter = Counter()
        for cur in self._cursors.values():
            c.update(cur.counts)
        return c

    def retries(self) -> int:
        """Remote reads reopened after a transport error since the loader was built (or as restored)."""
        return self._prev_retries + sum(c.retries for c in self._cursors.values())

    def noted_counts(self) -> dict[str, int]:
        """Samples trained on but changed (`vlp.data.oddities`: captions cut, extreme aspect ratios), by kind."""
        return dict(sorted(self._noted.items()))

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
        ds = WorkerStream(self)
        ds.epoch = self._epoch
        ds.rotation = self._batches_done % W
        for w in range(W):
            produced = len(range(w, self._batches_done, W))
            if produced and (w not in self._cursors or self._cursors[w].produced != produced):
                raise DataError("loader state is inconsistent with its batch count; cannot resume exactly")
        ds.cursors = dict(self._cursors)
        # Its own generator: a DataLoader iterator otherwise draws its base seed from torch's global RNG, so the
        # model's dropout masks after a resume would differ from the uninterrupted run's.
        gen = torch.Generator().manual_seed(mix(self.seed, self._epoch, self.rank, 5) >> 1)
        dl = DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.cfg.workers, generator=gen,
                        persistent_workers=False, prefetch_factor=4 if self.cfg.workers > 0 else None,
                        pin_memory=self.device_normalize and torch.cuda.is_available(), worker_init_fn=worker_init)
        finish = (lambda x: x) if self.device_normalize else self.transform.normalize
        try:
            for images, texts, cur, notes in start_workers(dl):
                self._warn(notes)
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

    def _warn(self, notes: list[tuple[str, str]]) -> None:
        """One stderr line per shard and fault (per loader): a size file that differs from what its shard holds, a
        shard given up as missing, unreadable (after `--shard-retries`), truncated or corrupt."""
        for key, line in notes:
            kind = counted_kind(key)
            if kind is not None:   # a sample trained on but changed: the first of its kind shown, all counted
                self._noted[kind] += 1
                if self._noted[kind] == 1:
                    print(line, file=sys.stderr, flush=True)
            elif key not in self._warned:
                self._warned.add(key)
                print(line, file=sys.stderr, flush=True)

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
            "prev_retries": int(self._prev_retries),
            "shards": self._shards_hash,
            # what vlp.data.plan.replan needs to continue this epoch exactly once on other ranks/workers
            "epoch_batches": self.plan(self._epoch).batches, "shuffle_buffer": int(self.cfg.shuffle_buffer),
            **({"pool": [list(x) for x in self._replanned[1]], "gen": self._replanned[2], "inexact": self._inexact}
               if self._replanned and self._replanned[0] == self._epoch else {}),
        }

    def load_state_dict(self, d: dict) -> None:
        if int(d.get("version", -1)) != STATE_VERSION:
            raise DataError(f"loader state version {d.get('version')} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("world_size", self.world_size), ("workers", self.n_workers),
                          ("batch_size", self.cfg.batch_size), ("resampled", bool(self.cfg.dataset_resampled)),
                          ("rank", self.rank)):
            if d.get(key) != mine:
                raise DataError(f"cannot resume the data loader exactly: saved with {key}={d.get(key)}, now {mine}")
        if "shuffle_buffer" in d and int(d["shuffle_buffer"]) != int(self.cfg.shuffle_buffer):
            raise DataError(f"cannot resume the data loader exactly: saved with --shuffle-buffer {d['shuffle_buffer']}"
                            f", now {self.cfg.shuffle_buffer}")
        saved, now = d.get("shards"), self._shards_hash
        if saved is not None and saved != now:
            raise DataError(f"cannot resume the data loader exactly: the shard list changed since the checkpoint "
                            f"(saved {saved}, now {now}: shard names, sizes or weights differ), so its epoch plan "
                            f"would repeat some samples and skip others; resume with the saved --train-data")
        self._epoch = int(d["epoch"])
        self._plans = {}
        self._replanned = (self._epoch, [tuple(x) for x in d["pool"]], int(d.get("gen", 0))) \
            if d.get("pool") is not None else None
        self._inexact = bool(d.get("inexact"))
        if self._inexact and self.rank == 0 and not d.get("batches_done"):
            print(f"warning: epoch {self._epoch} lost samples to unreadable shards before the change of ranks or "
                  f"workers; the rest of it is re-planned by position and may repeat or skip a few samples",
                  file=sys.stderr, flush=True)
        self._batches_done = int(d["batches_done"])
        cursors = [Cursor.from_list(x) for x in d.get("worker_state", [])]
        self._cursors = {c.worker: c for c in cursors}
        self._prev_counts = Counter({k: int(v) for k, v in d.get("prev_counts", {}).items()})
        self._prev_retries = int(d.get("prev_retries", 0))


def build_train_loader(cfg: DataConfig, preprocess: Any, tokenizer: Callable, *, rank: int = 0,
                       world_size: int = 1, seed: int = 0, device_normalize: bool = False) -> TrainLoader:
    """The training loader of the contract (docs/contracts.md). `device_normalize`: yield uint8 images (pinned
    when CUDA is available) for the consumer to normalise on its device with `loader.normalization`."""
    return TrainLoader(cfg, preprocess, tokenizer, rank=rank, world_size=world_size, seed=seed,
                       device_normalize=device_normalize)
