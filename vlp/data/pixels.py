"""Any PIL image mode -> 8-bit RGB, the one conversion every reader uses (training's fast path, its preprocess
path, evaluation, curation).

PIL's own `convert("RGB")` clips 16- and 32-bit values to 255 (a 16-bit grey PNG comes out white) and drops
transparency onto black or onto whatever colour the transparent pixels happen to hold. Here instead:
  * 16-bit modes (`I;16*`) are scaled by their range: v / 257, rounded;
  * 32-bit integer (`I`): values within 0..65535 are 16-bit data (PIL opens some 16-bit files as `I`) and are
    scaled as such; any other range is stretched linearly from its minimum and maximum onto 0..255;
  * 32-bit float (`F`): values within 0..1 are multiplied by 255, values within 0..255 are kept, any other
    range is stretched as for `I`; NaN counts as 0;
  * transparency (LA, La, PA, RGBA, RGBa, P or L or RGB with a transparent index or colour) is composited on
    `BACKGROUND`, white, as img2dataset composites;
  * CMYK, YCbCr, LAB, HSV, 1, L, P, RGBX use PIL's conversions, which are exact (CMYK multiplicative, YCbCr by
    JFIF's full-range matrix).
Kept free of torch, as vlp.data.images is.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def _grey8(values: np.ndarray) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey array -> uint8 by the rules in the module docstring."""
    if values.dtype.kind == "f":
        v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            return np.rint(v * 255).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.rint(v).astype(np.uint8)
    else:
        v = values.astype(np.int64)
        lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return ((v + 128) // 257).astype(np.uint8)
    if hi == lo:
        return np.zeros(v.shape, np.uint8)
    return np.rint((v - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (the image itself when it is RGB without a transparent colour already)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_grey8(np.asarray(im)), "L").convert("RGB")
    if mode in ALPHA_MODES or "transparency" in im.info:
        # un-premultiplies La (by way of LA, PIL has no La -> RGBA) and RGBa; applies a palette's or a colour key's
        # transparency
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")
        out = Image.new("RGB", im.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")
