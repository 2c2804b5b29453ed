"""Every PIL image mode, stored in a file that keeps it, decodes to the RGB a NumPy reference computes from the
file's own channels: on the training loader's fast path (`FastTransform.decode_crop`) and on the PIL path that
evaluation, curation and a custom preprocess use (`decode_rgb`). The references here are written from the
modes' definitions (16-bit v/257, transparency on white, CMYK, JFIF YCbCr, CIE L*a*b*, HSV), not from PIL.
"""
from __future__ import annotations

import colorsys
import io
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlp.data.images import decode_rgb
from vlp.data.pixels import to_rgb
from vlp.data.transforms import FastTransform

S = 16
RNG = np.random.default_rng(0)


def _u8(*shape):
    return RNG.integers(0, 256, (S, S, *shape) if shape else (S, S), dtype=np.uint8)


def _alpha():
    a = _u8()
    a[0, :4], a[1, :4] = 0, 255            # fully transparent and opaque pixels among the random ones
    return a


def _palette(im: Image.Image) -> Image.Image:
    im.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return im


def _frombytes(mode: str, arr: np.ndarray) -> Image.Image:
    return Image.frombytes(mode, (S, S), np.ascontiguousarray(arr).tobytes())


def _premultiplied(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return (colour.astype(np.uint16) * alpha[..., None] // 255).astype(np.uint8)


def _sources() -> dict[str, tuple[Image.Image, str]]:
    """name -> (image of that mode, file format that stores the mode as itself)."""
    ramp16 = (np.arange(S * S, dtype=np.uint32).reshape(S, S) * 65535 // (S * S - 1)).astype(np.uint16)
    p_trns = _palette(_frombytes("P", _u8()))
    p_trns.info["transparency"] = int(np.asarray(p_trns)[0, 0])
    rgb_key = _u8(3)
    rgb_key[2, :5] = (10, 20, 30)
    rgb_trns = _frombytes("RGB", rgb_key)
    rgb_trns.info["transparency"] = (10, 20, 30)
    lab = _u8(3)
    lab[..., 0] = lab[..., 0] // 2 + 64
    lab[..., 1:] = (lab[..., 1:].astype(np.int16) // 8 - 16).astype(np.int8).view(np.uint8)   # in the sRGB gamut
    return {
        "1": (_frombytes("L", _u8()).convert("1"), "PNG"),
        "L": (_frombytes("L", _u8()), "PNG"),
        "P": (_palette(_frombytes("P", _u8())), "PNG"),
        "P+transparency": (p_trns, "PNG"),
        "PA": (_palette(_frombytes("PA", np.stack([_u8(), _alpha()], -1))), "TIFF"),
        "LA": (_frombytes("LA", np.stack([_u8(), _alpha()], -1)), "PNG"),
        "RGB": (_frombytes("RGB", _u8(3)), "PNG"),
        "RGB+transparency": (rgb_trns, "PNG"),
        "RGBA": (_frombytes("RGBA", np.concatenate([_u8(3), _alpha()[..., None]], -1)), "PNG"),
        "CMYK": (_frombytes("CMYK", _u8(4)), "TIFF"),
        "CMYK JPEG": (_frombytes("CMYK", _u8(4)), "JPEG"),
        "L JPEG": (_frombytes("L", _u8()), "JPEG"),
        "RGB JPEG": (_frombytes("RGB", _u8(3)), "JPEG"),
        "YCbCr": (_frombytes("YCbCr", _u8(3)), "TIFF"),
        "LAB": (_frombytes("LAB", lab), "TIFF"),
        "I;16": (_frombytes("I;16", RNG.integers(0, 65536, (S, S)).astype("<u2")), "PNG"),
        "I;16 ramp": (_frombytes("I;16", ramp16.astype("<u2")), "PNG"),
        "I;16B": (_frombytes("I;16B", RNG.integers(0, 65536, (S, S)).astype(">u2")), "TIFF"),
        "I;16L": (_frombytes("I;16L", RNG.integers(0, 65536, (S, S)).astype("<u2")), "TIFF"),
        "I 16-bit values": (_frombytes("I", RNG.integers(0, 65536, (S, S)).astype(np.int32)), "TIFF"),
        "I wide": (_frombytes("I", RNG.integers(-2**31, 2**31 - 1, (S, S)).astype(np.int32)), "TIFF"),
        "F unit": (_frombytes("F", RNG.random((S, S), dtype=np.float32)), "TIFF"),
        "F 0-255": (_frombytes("F", (RNG.random((S, S)) * 255).astype(np.float32)), "TIFF"),
        "F wide": (_frombytes("F", (RNG.random((S, S)) * 4000 - 1000).astype(np.float32)), "TIFF"),
    }


# PIL writes no file that holds these modes as themselves; they reach a reader only as in-memory images.
IN_MEMORY = {
    "HSV": lambda: _frombytes("HSV", _u8(3)),
    "I;16N": lambda: _frombytes("I;16N", RNG.integers(0, 65536, (S, S)).astype("=u2")),
    "La": lambda: (lambda c, a: _frombytes("La", np.stack([_premultiplied(c[..., None], a)[..., 0], a], -1)))(_u8(), _alpha()),
    "RGBa": lambda: (lambda c, a: _frombytes("RGBa", np.concatenate([_premultiplied(c, a), a[..., None]], -1)))(_u8(3), _alpha()),
    "RGBX": lambda: _frombytes("RGBX", _u8(4)),
}


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return rgb * a + 255 * (1 - a)


def _stretch(v: np.ndarray) -> np.ndarray:
    return (v - v.min()) * 255.0 / (v.max() - v.min())


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    L = lab[..., 0] * 100.0 / 255
    a, b = (lab[..., i].astype(np.int8).astype(np.float64) for i in (1, 2))
    fy = (L + 16) / 116
    f = [fy + a / 500, fy, fy - b / 200]
    xyz = np.stack([np.where(t > 6 / 29, t ** 3, 3 * (6 / 29) ** 2 * (t - 4 / 29)) for t in f], -1) * (0.95047, 1.0, 1.08883)
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    lin = np.clip(xyz @ m.T, 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055) * 255


def reference(im: Image.Image) -> np.ndarray:
    """float [S, S, 3]: the RGB a mode's definition gives for the image's stored channels."""
    m, a = im.mode, np.asarray(im)
    grey = lambda g: np.repeat(np.asarray(g, np.float64)[..., None], 3, -1)  # noqa: E731
    if m == "1":
        return grey(a * 255.0)
    if m.startswith("I;16") or (m == "I" and a.min() >= 0 and a.max() <= 65535):
        return grey(a.astype(np.float64) / 257)
    if m == "I":
        return grey(_stretch(a.astype(np.float64)))
    if m == "F":
        return grey(a * 255.0 if a.max() <= 1 else a if a.min() >= 0 and a.max() <= 255 else _stretch(a.astype(np.float64)))
    trns = im.info.get("transparency")
    if m in ("L", "LA", "La", "P", "PA"):
        rgb = a if m in ("L", "P") else a[..., 0]
        rgb = np.array(im.getpalette("RGB")).reshape(-1, 3)[rgb] if m[0] == "P" else grey(rgb)
        alpha = a[..., 1] if m in ("LA", "La", "PA") else np.where(a == trns, 0, 255) if trns is not None else None
        if m == "La":
            return rgb + 255.0 - alpha[..., None]   # premultiplied: colour + background * (1 - alpha)
        return rgb if alpha is None else _on_white(rgb, alpha)
    if m == "RGB" and trns is not None:
        return _on_white(a, np.where((a == trns).all(-1), 0, 255))
    if m in ("RGB", "RGBX"):
        return a[..., :3].astype(np.float64)
    if m == "RGBA":
        return _on_white(a[..., :3], a[..., 3])
    if m == "RGBa":
        return a[..., :3] + 255.0 - a[..., 3:]
    if m == "CMYK":
        c = a.astype(np.float64)
        return (255 - c[..., :3]) * (255 - c[..., 3:]) / 255
    if m == "YCbCr":
        y, cb, cr = (a[..., i].astype(np.float64) - (0, 128, 128)[i] for i in range(3))
        return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1).clip(0, 255)
    if m == "LAB":
        return _lab_to_srgb(a)
    if m == "HSV":
        hsv = a.reshape(-1, 3) / 255.0
        return np.array([colorsys.hsv_to_rgb(*p) for p in hsv]).reshape(S, S, 3) * 255
    raise AssertionError(f"no reference for mode {m}")


def _stored(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _close(got: np.ndarray, want: np.ndarray, name: str, *, tol: float):
    assert got.shape == (S, S, 3) and got.dtype == np.uint8, name
    g = got.astype(np.float64)
    means, want_means = g.mean((0, 1)), want.mean((0, 1))
    assert np.abs(means - want_means).max() <= max(1.0, tol / 4), f"{name}: channel means {means} != reference {want_means}"
    worst = np.abs(g - want).max()
    assert worst <= tol, f"{name}: a pixel is {worst} levels from the reference (pixel 0,0: {g[0, 0]} vs {want[0, 0]})"


def _fast(data: bytes) -> np.ndarray:
    return FastTransform(S, train=False).decode_crop(data, random.Random(0)).permute(1, 2, 0).numpy()


def test_every_pil_mode_is_covered():
    stored = {src.mode for src, _ in _sources().values()}
    assert stored | set(IN_MEMORY) >= set(Image.MODES), set(Image.MODES) - stored - set(IN_MEMORY)


@pytest.mark.parametrize("name", sorted(_sources()))
def test_stored_mode_decodes_to_the_reference_on_both_paths(name):
    image, fmt = _sources()[name]
    data = _stored(image, fmt)
    raw = Image.open(io.BytesIO(data))
    raw.load()
    assert fmt == "JPEG" or raw.mode == image.mode or raw.mode == "I;16", (name, raw.mode)  # PNG reads I;16B as I;16
    want = reference(raw)
    tol = 8 if raw.mode == "LAB" else 1   # PIL's L*a*b* is within 8 levels of the CIE formulas
    _close(np.asarray(decode_rgb(data)), want, f"{name} (PIL path)", tol=tol)
    _close(_fast(data), want, f"{name} (fast path)", tol=tol if fmt != "JPEG" else 6)  # libjpeg-turbo's own IDCT


@pytest.mark.parametrize("mode", sorted(IN_MEMORY))
def test_in_memory_mode_converts_to_the_reference(mode):
    image = IN_MEMORY[mode]()
    _close(np.asarray(to_rgb(image)), reference(image), mode, tol=1)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp, _ = _sources()["I;16 ramp"]
    data = _stored(ramp, "PNG")
    for got in (np.asarray(decode_rgb(data)), _fast(data)):
        assert abs(got.mean() - 127.5) < 1.0, got.mean()    # was 254.5: every value over 255 clipped to white


def test_fast_path_raises_no_warning():
    """The PIL branch handed torch a read-only array ('The given NumPy array is not writable'), once a process."""
    code = ("import io, random, warnings; from PIL import Image; from vlp.data.transforms import FastTransform\n"
            "buf = io.BytesIO(); Image.new('RGB', (40, 30), (9, 99, 199)).save(buf, 'PNG')\n"
            "warnings.simplefilter('error')\n"
            "FastTransform(16, train=True).decode_crop(buf.getvalue(), random.Random(0))\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr[-2000:]
