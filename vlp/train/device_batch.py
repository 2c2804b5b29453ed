"""Batches onto the training device, images normalised there.

On CUDA the loader hands over uint8 images in pinned memory (a quarter of the float bytes, copied
asynchronously) and the trainer turns them into normalised images on the GPU with the loader's own
arithmetic (`vlp.data.transforms.Uint8Normalizer`: the same floats as the host path, bit for bit), stored
in the run's compute dtype (bf16 under bf16 autocast). On CPU the loader normalises on the host as before
(into reused buffers): there is no transfer to save, and that path is already the fast one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vlp import precision as prec
from vlp.data.transforms import Uint8Normalizer

__all__ = ["DeviceBatch", "wanted", "for_run"]


def wanted(device) -> bool:
    """Whether the loader should hand over uint8 images for the device to normalise."""
    return torch.device(device).type == "cuda"


class DeviceBatch:
    """(images, texts) from the loader -> on `device`; uint8 images become normalised `dtype` images there.

    `normalization` is the loader's (mean, std) on the 0-1 scale (`TrainLoader.normalization`); float
    images (the host path, or a preprocess the loader applies as is) pass through unchanged."""

    def __init__(self, device, normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                 dtype: torch.dtype = torch.float32, input_dtype: Optional[torch.dtype] = None):
        self.device, self.dtype = torch.device(device), dtype
        self.input_dtype = input_dtype  # float images cast to it: open_clip's bf16/fp16/pure_* 16-bit weights
        self.normalize = Uint8Normalizer(*normalization, device=self.device) if normalization is not None else None

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    """The DeviceBatch for a training loader and a run's resolved --precision."""
    return DeviceBatch(device, loader.normalization if loader.device_normalize else None,
                       prec.compute_dtype(precision), prec.input_dtype(precision))
