"""Image members of a sample: which extensions count as the image, and opening their bytes with a skip reason.

Kept free of torch so that the shard tools (`make_shards`, `inspect_shards`) classify images exactly as the
loader does without importing it.
"""
from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from vlp.data import errors as E

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # a sample's image is its first member with one of these


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image (header read only); SkipSample(not_image | corrupt_image)."""
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, ValueError, TypeError):
        raise E.SkipSample(E.NOT_IMAGE) from None
    except Exception as e:  # noqa: BLE001
        raise E.SkipSample(E.CORRUPT_IMAGE, str(e)) from None


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decoded RGB PIL image; SkipSample(not_image | corrupt_image)."""
    im = open_image(data)
    try:
        im.load()
        return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt image
        raise E.SkipSample(E.CORRUPT_IMAGE, str(e)) from None
