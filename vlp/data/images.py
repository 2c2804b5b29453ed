"""Image members of a sample: which extensions count as the image, opening their bytes with a skip reason, and
the EXIF orientation (applied here for every reader: training, evaluation, make_shards' re-encoding).

Kept free of torch so that the shard tools (`make_shards`, `inspect_shards`) classify images exactly as the
loader does without importing it.
"""
from __future__ import annotations

import io
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from vlp.data import errors as E
from vlp.data.pixels import to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # a sample's image is its first member with one of these
# image files in a folder (make_shards' folder input, eval's image folders)
IMAGE_FILE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"})


def image_ext(exts) -> Optional[str]:
    """Which of a sample's member extensions is its image: THE rule (train, eval and tools alike)."""
    return next((e for e in IMAGE_EXTS if e in exts), None)


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image (header read only); SkipSample(not_image | corrupt_image | image_too_large).

    An image whose header claims more than PIL's `Image.MAX_IMAGE_PIXELS` (89.5 M; None: no limit) is refused
    before decoding: a 33 kB single-colour 12000x12000 PNG otherwise decodes to 432 MB of RGB (a loader process's
    peak RSS went from 1.15 to 1.91 GB); PIL itself only warns below twice that limit."""
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, ValueError, TypeError):
        raise E.SkipSample(E.NOT_IMAGE) from None
    except Exception as e:  # noqa: BLE001 - PIL's DecompressionBombError (over twice the limit) included
        raise E.SkipSample(E.CORRUPT_IMAGE, str(e)) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.size[0] * im.size[1] > limit:
        raise E.SkipSample(E.IMAGE_TOO_LARGE, f"{im.size[0]}x{im.size[1]} pixels > {limit}")
    return im


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = stored upright), read from the header without decoding."""
    if "exif" not in im.info:
        return 1
    try:
        o = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1
    return o if 1 <= o <= 8 else 1


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen (PIL's `exif_transpose`); the image itself when stored upright."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decoded, upright 8-bit RGB PIL image (`vlp.data.pixels.to_rgb`); SkipSample(not_image | corrupt_image)."""
    im = open_image(data)
    try:
        im.load()
        return to_rgb(upright(im))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt image
        raise E.SkipSample(E.CORRUPT_IMAGE, str(e)) from None
