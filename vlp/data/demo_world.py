"""A procedural image-caption world for the built-in demo and for tests.

Each scene holds one or two coloured shapes of a given size and position on a noisy
background. Captions describe them compositionally ("a small red circle above a blue
square"); every scene has several phrasings, so the LaCLIP rewrite path has material:
one terse web-style caption (the original `.txt`) and the others as rewrites.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
SIZES = {"small": 0.22, "large": 0.42}
# Named anchor positions as fractions of the canvas (x, y).
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}

# Templates for zero-shot classification of the demo eval sets.
COLOR_TEMPLATES = ["a photo of a {c} shape.", "a {c} object.", "something {c}.", "a picture of a {c} thing."]
SHAPE_TEMPLATES = ["a photo of a {c}.", "a {c} shape.", "a drawing of a {c}.", "there is a {c}."]


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    size: str
    position: str


def _draw_shape(draw: ImageDraw.ImageDraw, t: Thing, w: int, rng: random.Random) -> None:
    cx, cy = POSITIONS[t.position]
    cx = (cx + rng.uniform(-0.04, 0.04)) * w
    cy = (cy + rng.uniform(-0.04, 0.04)) * w
    r = SIZES[t.size] * w / 2 * rng.uniform(0.9, 1.1)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[t.color])
    if t.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif t.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif t.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif t.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif t.shape == "cross":
        a = r / 3
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(t.shape)


def render(things: list[Thing], size: int, rng: random.Random) -> Image.Image:
    """Draw the scene on a mid-grey noisy background (so black and white shapes both show)."""
    base = rng.randint(95, 160)
    img = Image.new("RGB", (size, size), (base, base + rng.randint(-10, 10), base + rng.randint(-10, 10)))
    noise = Image.effect_noise((size, size), 18).convert("RGB")
    img = Image.blend(img, noise, 0.15)
    draw = ImageDraw.Draw(img)
    for t in things:
        _draw_shape(draw, t, size, rng)
    return img.filter(ImageFilter.GaussianBlur(0.4))


_REL = {("left", "right"): "to the left of", ("right", "left"): "to the right of",
        ("top", "bottom"): "above", ("bottom", "top"): "below"}
_POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the middle"}


def phrasings(things: list[Thing], rng: random.Random) -> list[str]:
    """Several captions of one scene: the first is terse alt-text style, the rest fuller sentences."""
    if len(things) == 1:
        t = things[0]
        terse = f"{t.color} {t.shape} {t.size} {t.position}"
        return [
            terse,
            f"a {t.size} {t.color} {t.shape} {_POS_PHRASE[t.position]}",
            f"a photo of a {t.color} {t.shape}.",
            f"there is a {t.size} {t.shape} colored {t.color} {_POS_PHRASE[t.position]}.",
            f"an image showing one {t.color} {t.shape} on a grey background",
        ]
    a, b = things
    rel = _REL[(a.position, b.position)]
    return [
        f"{a.color} {a.shape} {b.color} {b.shape}",
        f"a {a.size} {a.color} {a.shape} {rel} a {b.size} {b.color} {b.shape}",
        f"a photo of a {a.color} {a.shape} and a {b.color} {b.shape}.",
        f"two shapes: a {a.color} {a.shape} {rel} a {b.color} {b.shape}.",
        f"a {b.color} {b.shape} with a {a.color} {a.shape} {_POS_PHRASE[a.position]}",
    ]


def random_scene(rng: random.Random, two_prob: float = 0.3) -> list[Thing]:
    """One shape anywhere, or two shapes in a left/right or top/bottom arrangement."""
    if rng.random() < two_prob:
        pa, pb = rng.choice(list(_REL))
        colors = rng.sample(list(COLORS), 2)
        return [Thing(colors[0], rng.choice(SHAPES), rng.choice(["small"]), pa),
                Thing(colors[1], rng.choice(SHAPES), rng.choice(["small"]), pb)]
    return [Thing(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))]


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
             "below": "above"}


def hard_negatives(things: list[Thing], rng: random.Random) -> tuple[str, dict[str, str]]:
    """A two-shape scene's caption and SugarCrepe-style negatives that reuse its words: {subset: negative}.

    "a red circle to the left of a blue square" ->
    swap_att "a blue circle to the left of a red square", swap_obj "a red square to the left of a blue circle",
    replace_att (a colour not in the scene), replace_obj (a shape not in the scene), replace_rel ("to the right of").
    swap_obj is left out when both shapes are the same (the swap would not change the caption)."""
    a, b = things
    rel = _REL[(a.position, b.position)]

    def cap(ca, sa, r, cb, sb):
        return f"a {ca} {sa} {r} a {cb} {sb}"

    out = {"swap_att": cap(b.color, a.shape, rel, a.color, b.shape),
           "replace_att": cap(rng.choice([c for c in COLORS if c not in (a.color, b.color)]), a.shape, rel,
                              b.color, b.shape),
           "replace_obj": cap(a.color, rng.choice([s for s in SHAPES if s not in (a.shape, b.shape)]), rel,
                              b.color, b.shape),
           "replace_rel": cap(a.color, a.shape, _OPPOSITE[rel], b.color, b.shape)}
    if a.shape != b.shape:
        out["swap_obj"] = cap(a.color, b.shape, rel, b.color, a.shape)
    return cap(a.color, a.shape, rel, b.color, b.shape), out
