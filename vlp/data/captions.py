"""Which text a sample yields: its caption or one of its rewrites (LaCLIP), optionally augmented.

Rewrites are stored in each sample's `.json` under `DataConfig.rewrites_field` (default
`"rewrites"`) as a list of strings; `data_tools.add_rewrites` writes them there.
"""
from __future__ import annotations

import json
import random
from typing import Callable, Optional

from vlp.data import errors as E


def read_meta(files: dict[str, bytes]) -> dict:
    """The sample's `.json` as a dict; {} when absent, not JSON or not an object."""
    raw = files.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_caption(files: dict[str, bytes]) -> str:
    """The original caption: `.txt`, else the `caption` of `.json` (img2dataset writes both). Raises SkipSample."""
    raw = files.get("txt")
    if raw is None:
        if "json" in files:
            cap = read_meta(files).get("caption")
            if isinstance(cap, str):
                if not cap.strip():
                    raise E.SkipSample(E.EMPTY_CAPTION)
                return cap.strip()
        raise E.SkipSample(E.MISSING_CAPTION)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise E.SkipSample(E.BAD_CAPTION_ENCODING) from None
    text = text.strip()
    if not text:
        raise E.SkipSample(E.EMPTY_CAPTION)
    return text


def read_rewrites(files: dict[str, bytes], field: str) -> list[str]:
    """The sample's rewrites (a list of strings in `.json[field]`); [] when absent or unreadable."""
    val = read_meta(files).get(field)
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list):
        return []
    return [v for v in val if isinstance(v, str)]


def pick_caption(original: str, rewrites: list[str], rng: random.Random) -> str:
    """LaCLIP's rule: uniform over [original, *rewrites]; a pick with fewer than 2 words falls back."""
    if not rewrites:
        return original
    i = rng.randrange(len(rewrites) + 1)
    if i == 0:
        return original
    pick = rewrites[i - 1].strip()
    return pick if len(pick.split()) >= 2 else original


class CaptionPicker:
    """caption(files, rng) -> the text for this draw of the sample."""

    def __init__(self, use_rewrites: bool = False, rewrites_field: str = "rewrites", text_aug: Optional[str] = None):
        self.use_rewrites = use_rewrites
        self.field = rewrites_field
        self.text_aug = text_aug
        self._augment: Optional[Callable[[str, str, random.Random], str]] = None
        if text_aug:
            from vlp.data.text_aug import augment  # lazy: only when text augmentation is on

            self._augment = augment

    def needs_json(self) -> bool:
        return self.use_rewrites

    def __call__(self, files: dict[str, bytes], rng: random.Random) -> str:
        text = decode_caption(files)
        if self.use_rewrites:
            text = pick_caption(text, read_rewrites(files, self.field), rng)
        if self._augment is not None:
            out = self._augment(text, self.text_aug, rng)
            if out and out.strip():
                text = out
        return text
