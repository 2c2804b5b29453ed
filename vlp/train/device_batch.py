"""Batches onto the training device, images normalised there.

On CUDA the loader hands over uint8 images in pinned memory (a quarter of the float bytes, copied
asynchronously) and the trainer turns them into normalised images on the GPU with the loader's own
arithmetic (`vlp.data.transforms.Uint8Normalizer`: the same floats as the host path, bit for bit), stored
in the run's compute dtype (bf16 under bf16 autocast). On CPU the loader normalises on the host as before
(into reused buffers): there is no transfer to save, and that path is already the fast one.

On CUDA the copy and the normalisation of the next step's batches run on a side stream (`CopyStream`), as
torchtitan's and DALI's loaders do: enqueued on the compute stream they would wait for the current step's
backward, and the next step would wait for them. The feed fetches step i+1 during step i; when step i+1 becomes
current (`ready()`), the compute stream waits for the copy's event, and each tensor is marked as used by the
compute stream (`record_stream`) so that the caching allocator does not hand its memory to the side stream's next
copy while the step still reads it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vlp import precision as prec
from vlp.data.transforms import Uint8Normalizer

__all__ = ["DeviceBatch", "CopyStream", "wanted", "for_run"]


def wanted(device) -> bool:
    """Whether the loader should hand over uint8 images for the device to normalise."""
    return torch.device(device).type == "cuda"


class CudaStreams:
    """torch.cuda's streams and events, as `CopyStream` uses them (a stand-in with the same methods runs its logic
    on CPU in the tests)."""

    Stream, Event, stream, current_stream = (torch.cuda.Stream, torch.cuda.Event, torch.cuda.stream,
                                             torch.cuda.current_stream)

    @staticmethod
    def record(tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


class CopyStream:
    """Work enqueued on a side stream of `device` (`run`), handed to the compute stream when it is needed
    (`hand_over`): the compute stream waits for the work's event; the tensors are recorded as used there."""

    def __init__(self, device, streams=CudaStreams):
        self.device, self.streams = torch.device(device), streams
        self.side = streams.Stream(device=self.device)

    def run(self, fn):
        """fn() enqueued on the side stream; returns (its result, the event recorded after it)."""
        with self.streams.stream(self.side):
            out = fn()
            event = self.streams.Event()
            event.record(self.side)
        return out, event

    def hand_over(self, tensors, event) -> None:
        compute = self.streams.current_stream(self.device)
        compute.wait_event(event)
        for t in tensors:
            self.streams.record(t, compute)


class DeviceBatch:
    """(images, texts) from the loader -> on `device`; uint8 images become normalised `dtype` images there.

    `normalization` is the loader's (mean, std) on the 0-1 scale (`TrainLoader.normalization`); float
    images (the host path, or a preprocess the loader applies as is) pass through unchanged. With a `copy_stream`
    the work runs there, and `ready()` hands the batches moved since the last call to the compute stream."""

    def __init__(self, device, normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                 dtype: torch.dtype = torch.float32, input_dtype: Optional[torch.dtype] = None,
                 copy_stream: Optional[CopyStream] = None):
        self.device, self.dtype = torch.device(device), dtype
        self.input_dtype = input_dtype  # float images cast to it: open_clip's bf16/fp16/pure_* 16-bit weights
        self.normalize = Uint8Normalizer(*normalization, device=self.device) if normalization is not None else None
        self.copy_stream, self._moved = copy_stream, []

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.copy_stream is None:
            return self._move(images, texts)
        out, event = self.copy_stream.run(lambda: self._move(images, texts))
        self._moved.append((out, event))
        return out

    def ready(self) -> None:
        """The batches moved since the last call may now be used on the compute stream."""
        for tensors, event in self._moved:
            self.copy_stream.hand_over(tensors, event)
        self._moved = []

    def _move(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError("uint8 images need the loader's normalization (mean, std)")
            images = self.normalize(images, self.dtype)
        elif self.input_dtype is not None:
            images = images.to(self.input_dtype)
        return images, texts


def for_run(device, loader, precision: str) -> DeviceBatch:
    """The DeviceBatch for a training loader and a run's resolved --precision (copies on a side stream on CUDA)."""
    return DeviceBatch(device, loader.normalization if loader.device_normalize else None,
                       prec.compute_dtype(precision), prec.input_dtype(precision),
                       copy_stream=CopyStream(device) if torch.device(device).type == "cuda" else None)
