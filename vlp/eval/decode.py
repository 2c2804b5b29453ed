"""Decode and preprocess eval images in batches, as the training loader decodes them.

Each sample carries its index, so several workers may decode in parallel while the order of results
stays that of the set. An image that cannot be decoded is skipped and counted (as training skips it).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from vlp.data.errors import MISSING_IMAGE, SkipSample
from vlp.data.images import decode_rgb
from vlp.eval.evalset import EvalError, Sample
from vlp.runtime.preemption import start_workers, worker_init


class UndecodableImage(EvalError):
    """An image that cannot be read or decoded; `reason` is training's skip reason (`vlp.data.errors`)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def decode_image(sample: Sample):
    """RGB PIL image, decoded as the training loader decodes (`vlp.data.images.decode_rgb`: EXIF orientation applied)."""
    try:
        data = sample.data
        if data is None:
            with open(sample.path, "rb") as fh:
                if sample.span is not None:
                    fh.seek(sample.span[0])
                    data = fh.read(sample.span[1])
                else:
                    data = fh.read()
        return decode_rgb(data)
    except (SkipSample, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        reason = e.reason if isinstance(e, SkipSample) else MISSING_IMAGE
        raise UndecodableImage(f"cannot decode image {sample.key} ({sample.where}): {first}", reason) from None


class _Decoded(torch.utils.data.IterableDataset):
    """Decode + preprocess; worker w takes samples w, w+W, ... and tags each with its index."""

    def __init__(self, samples: list[Sample], preprocess: Callable):
        self.samples, self.preprocess = samples, preprocess

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in range(wid, len(self.samples), nw):
            try:
                x = self.preprocess(decode_image(self.samples[i]))
            except UndecodableImage as e:    # reported in the main process, so the message stays one line
                yield i, None, (e.reason, str(e))
                continue
            yield i, x, None


def _collate(batch):
    return batch


def iter_batches(samples: list[Sample], preprocess: Callable, batch_size: int, num_workers: int = 0,
                 skipped: Optional[list] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices [B], images [B,3,H,W]) batches; with workers the order of batches may interleave.

    An image that cannot be decoded raises `UndecodableImage`, or, given a `skipped` list, is left out of its
    batch and recorded there as (index, reason, message), as the training loader skips and counts it."""
    ds = _Decoded(samples, preprocess)
    if num_workers > 0:
        per_worker = (len(samples) + num_workers - 1) // num_workers
        num_workers = max(1, min(num_workers, per_worker // 8 or 1))
    # Workers ignore the stop signals a launcher sends the whole process group (as training's do): an in-loop
    # eval then finishes its set and training saves, instead of losing the set to "DataLoader worker killed".
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                         persistent_workers=False, worker_init_fn=worker_init)
    for batch in start_workers(loader):
        for i, _, err in batch:
            if err is not None:
                if skipped is None:
                    raise UndecodableImage(err[1], err[0])
                skipped.append((i, *err))
        batch = [b for b in batch if b[2] is None]
        if batch:
            yield torch.tensor([b[0] for b in batch], dtype=torch.long), torch.stack([b[1] for b in batch])
