"""Batches onto the training device, images normalised there.

On CUDA the loader hands over uint8 images in pinned memory (a quarter of the float bytes, copied
asynchronously) and the trainer turns them into normalised images on the GPU in one fused op
(`addcmul`: x * 1/(255 std) - mean/std, computed in float32 and stored once in the run's compute dtype:
bf16 under bf16 autocast). On CPU the loader normalises on the host as before (into reused buffers):
there is no transfer to save, and that path is already the fast one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["DeviceBatch", "wanted"]


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
        self.scale = self.shift = None
        if normalization is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalization)
            self.scale = (1.0 / (std * 255)).to(self.device)
            self.shift = (-mean / std).to(self.device)

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            if self.scale is None:
                raise ValueError("uint8 images need the loader's normalization (mean, std)")
            out = torch.empty(images.shape, dtype=self.dtype, device=self.device)
            images = torch.addcmul(self.shift, images, self.scale, out=out)
        elif self.input_dtype is not None:
            images = images.to(self.input_dtype)
        return images, texts
