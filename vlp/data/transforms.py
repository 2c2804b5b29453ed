"""Image transforms for training: decode fast, crop, resize, (strong views), normalise per batch.

`FastTransform` reproduces open_clip's train transform (RandomResizedCrop(size, scale, ratio 3/4..4/3,
bicubic, antialias) -> RGB -> tensor -> Normalize) and val transform (Resize shorter side + CenterCrop)
with less work:
  * the crop box is drawn on the stored image size (read from the header, no decode);
  * JPEGs whose crop is at least 2x the target are decoded at 1/2, 1/4 or 1/8 size by libjpeg's DCT
    scaling (PIL draft mode), never below the target resolution;
  * other JPEGs are decoded by libjpeg-turbo straight into a uint8 tensor (torchvision.io), the crop is a
    view and the resize is torch's antialiased uint8 resize; one float conversion + normalise per batch.
All randomness comes from the `random.Random` passed per sample, so a sample's augmentation is a
function of the loader's seed and position (needed for exact resume).

Strong views (Fini et al., clip-rocket): crop scale 0.08-1, colour jitter (.4, .4, .4, .1) p=0.8,
grayscale p=0.2, Gaussian blur p=0.5 (sigma 0.1-2), horizontal flip p=0.5.
"""
from __future__ import annotations

import math
import random
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from vlp.data import errors as E
from vlp.data.buffers import BufferPool
from vlp.data.images import decode_rgb, open_image, orientation, upright
from vlp.data.pixels import to_rgb

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}

warnings.filterwarnings("ignore", message="The given buffer is not writable")
# torchvision 0.29 marks its image decoders deprecated (in favour of torchcodec) on every call
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)


def rrc_params(w: int, h: int, scale: Sequence[float], ratio: Sequence[float],
               rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a Python RNG: (left, top, width, height)."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def center_params(w: int, h: int) -> tuple[int, int, int, int]:
    """Resize(shorter side) + CenterCrop as one box: the centred square of side min(w, h)."""
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, s, s


def transform_params(preprocess: Any) -> dict:
    """Target size, mean, std, interpolation and train/val from an open_clip (torchvision) Compose."""
    out = {"size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "train": True,
           "recognised": preprocess is None}
    ops = getattr(preprocess, "transforms", None)
    if not ops:
        return out
    first = ops[0]
    name = type(first).__name__
    if name in ("RandomResizedCrop", "Resize", "ResizeKeepRatio"):
        size = getattr(first, "size", None)
        if isinstance(size, (list, tuple)):
            size = size[0]
        if isinstance(size, int):
            out["size"] = size
            out["train"] = name == "RandomResizedCrop"
            interp = getattr(first, "interpolation", None)
            out["interpolation"] = "bilinear" if "BILINEAR" in str(interp).upper() else "bicubic"
            if out["train"]:
                out["scale"] = tuple(first.scale)
            for op in ops:
                if type(op).__name__ == "Normalize":
                    out["mean"], out["std"] = tuple(op.mean), tuple(op.std)
                    out["recognised"] = True
    return out


class Uint8Normalizer:
    """The one uint8 -> normalised float conversion: `(x - 255 mean) * (1 / (255 std))` in float32, subtract then
    multiply, rounded once more only when a 16-bit `dtype` is asked for. The loader's host path
    (`FastTransform.normalize`, NumPy) and the trainer's device path (`vlp.train.device_batch`) both apply it, so
    a batch normalised on the GPU is bit for bit the one normalised on the host (a fused multiply-add,
    `x * s + t`, is not: it rounds differently)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device="cpu"):
        self.mean_255 = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
        self.inv_std_255 = 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = batch.to(torch.float32).sub_(self.mean_255).mul_(self.inv_std_255)
        return x if dtype == torch.float32 else x.to(dtype)

    def into(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The same floats written into `out` (CPU) one image at a time by NumPy: torch would spread each op over
        its intra-op threads, which spin waiting for cores the loader workers are using (on 2 cores that tripled
        the main process's CPU time and cost a fifth of the throughput)."""
        src, dst = batch.numpy(), out.numpy()
        mean, inv_std = self.mean_255.numpy()[0], self.inv_std_255.numpy()[0]
        for i in range(len(src)):
            np.subtract(src[i], mean, out=dst[i])
            np.multiply(dst[i], inv_std, out=dst[i])
        return out


def normalize_uint8(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B,3,H,W] on any device -> normalised float32 (`Uint8Normalizer`): bit for bit what the loader's host
    path yields, for consumers of `build_train_loader(..., device_normalize=True)`."""
    return Uint8Normalizer(mean, std, batch.device)(batch)


class FastTransform:
    """(image bytes, rng) -> uint8 [3, S, S]; `finish(list)` -> normalised float [B, 3, S, S]."""

    def __init__(self, size: int, mean=OPENAI_MEAN, std=OPENAI_STD, *, train: bool = True,
                 scale: Sequence[float] = (0.9, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 strong: bool = False, strong_scale: Sequence[float] = (0.08, 1.0),
                 interpolation: str = "bicubic"):
        self.size = int(size)
        self.train, self.strong = train, strong
        self.scale = tuple(strong_scale if strong else scale)
        self.ratio = tuple(ratio)
        self.interp = _INTERP[interpolation]
        self.normalization = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        self.normalizer = Uint8Normalizer(mean, std)
        self._out = BufferPool()
        self.last_size: Optional[tuple[int, int]] = None   # the last image's upright size

    def _box(self, w: int, h: int, rng: random.Random):
        if self.train:
            return rrc_params(w, h, self.scale, self.ratio, rng)
        return center_params(w, h)

    def decode_crop(self, data: bytes, rng: random.Random) -> torch.Tensor:
        S = self.size
        im = open_image(data)
        turn = orientation(im)
        w, h = im.size[::-1] if turn >= 5 else im.size   # the upright size (EXIF orientations 5-8 swap the sides)
        self.last_size = (w, h)   # for the loader's count of extreme aspect ratios (vlp.data.oddities)
        x0, y0, cw, ch = self._box(w, h, rng)
        try:
            k = next((k for k in (8, 4, 2) if cw // k >= S and ch // k >= S), 1) if im.format == "JPEG" else 1
            if im.format == "JPEG" and k == 1 and turn == 1:
                x = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
            else:   # PIL: a JPEG at 1/k size (DCT scaling), other formats, and every image not stored upright
                if k > 1:
                    im.draft("RGB", (im.size[0] // k, im.size[1] // k))
                im.load()
                im = to_rgb(upright(im))
                sx, sy = im.size[0] / w, im.size[1] / h
                if (sx, sy) != (1, 1):
                    x0, y0 = int(x0 * sx), int(y0 * sy)
                    cw, ch = max(1, int(round(cw * sx))), max(1, int(round(ch * sy)))
                # the crop copied out of PIL's read-only pixels: torch may write to what it is given
                x = torch.from_numpy(np.asarray(im)[y0:y0 + ch, x0:x0 + cw].copy()).permute(2, 0, 1)
                x0 = y0 = 0
        except E.SkipSample:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt image
            raise E.SkipSample(E.CORRUPT_IMAGE, str(e)[:200]) from None
        x = x[:, y0:y0 + ch, x0:x0 + cw]
        return TF.resize(x, [S, S], interpolation=self.interp, antialias=True)

    def _strong(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if rng.random() < 0.8:
            ops = [
                lambda t, f=rng.uniform(0.6, 1.4): TF.adjust_brightness(t, f),
                lambda t, f=rng.uniform(0.6, 1.4): TF.adjust_contrast(t, f),
                lambda t, f=rng.uniform(0.6, 1.4): TF.adjust_saturation(t, f),
                lambda t, f=rng.uniform(-0.1, 0.1): TF.adjust_hue(t, f),
            ]
            rng.shuffle(ops)
            for op in ops:
                x = op(x)
        if rng.random() < 0.2:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if rng.random() < 0.5:
            k = max(3, int(0.1 * self.size) // 2 * 2 + 1)
            s = rng.uniform(0.1, 2.0)
            x = TF.gaussian_blur(x, [k, k], [s, s])
        if rng.random() < 0.5:
            x = TF.horizontal_flip(x)
        return x

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        x = self.decode_crop(data, rng)
        if self.strong:
            x = self._strong(x, rng)
        return x

    def finish(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Worker side: the uint8 batch, written straight into shared memory when in a loader worker.

        A float batch built in the worker cost a fresh 4-byte-per-pixel buffer plus a second copy into
        shared memory for every batch (a third of the worker's time went to page faults); uint8 is a
        quarter of the bytes, and `normalize` converts once on the receiving side."""
        shape = (len(xs),) + tuple(xs[0].shape)
        if torch.utils.data.get_worker_info() is not None:
            storage = torch.UntypedStorage._new_shared(math.prod(shape))
            batch = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
        else:
            batch = torch.empty(shape, dtype=torch.uint8)
        return torch.stack(xs, out=batch)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Receiving side: uint8 [B,3,S,S] -> normalised float (`Uint8Normalizer`), into a reused buffer
        (`BufferPool`)."""
        return self.normalizer.into(batch, self._out.take(batch.shape))


class PreprocessTransform:
    """Fallback for a preprocess vlp does not recognise: PIL decode + the given callable, its torch
    randomness seeded from the per-sample rng (so it stays reproducible)."""

    def __init__(self, preprocess: Callable):
        self.preprocess = preprocess

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        im = decode_rgb(data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            return self.preprocess(im)

    def finish(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return batch  # the user's preprocess already normalised


def build_transform(preprocess: Any, *, rrc_scale: Optional[Sequence[float]] = None, strong: bool = False,
                    strong_scale: Sequence[float] = (0.08, 1.0), fast: bool = True):
    """The transform the loader applies: FastTransform from `preprocess`'s parameters when recognised."""
    p = transform_params(preprocess)
    if fast and p["recognised"]:
        return FastTransform(p["size"], p["mean"], p["std"], train=p["train"] or strong,
                             scale=rrc_scale or p.get("scale", (0.9, 1.0)), strong=strong,
                             strong_scale=strong_scale, interpolation=p["interpolation"])
    return PreprocessTransform(preprocess)
