"""Per-sample curation rules over an embed table: each returns which of the `alive` rows it removes.

A rule is `fn(table, alive) -> bool [N]` (True: remove), only ever True where `alive` is: `filter.py` runs the
rules in order on what earlier ones kept, and each alone on every valid row, and counts both.
DataComp's basic filters for web pools are caption length > 2 words, image side > 200 px, aspect ratio < 3;
its CLIP-score baseline keeps the top 30 % of the pool by image-text cosine (shared/reference.md).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional

import numpy as np

from vlp.curate.store import Table

Rule = Callable[[Table, np.ndarray], np.ndarray]
_PUNCT = re.compile(r"[^\w\s]+")


def normalise_caption(caption: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: how repeated captions are compared."""
    return " ".join(_PUNCT.sub(" ", caption.lower()).split())


def caption_words(min_words: int = 0, max_words: Optional[int] = None) -> Rule:
    """Captions with fewer than `min_words` or more than `max_words` words (split on white space)."""
    def rule(t: Table, alive: np.ndarray) -> np.ndarray:
        n = np.array([len(c.split()) for c in t.caption], dtype=np.int64)
        bad = n < min_words
        if max_words is not None:
            bad |= n > max_words
        return bad & alive
    return rule


def caption_repeats(max_repeats: int) -> Rule:
    """Boilerplate: every pair whose normalised caption occurs more than `max_repeats` times among the alive
    rows ("click to enlarge", "image", a shop's one template line)."""
    def rule(t: Table, alive: np.ndarray) -> np.ndarray:
        norm = [normalise_caption(c) for c in t.caption]
        counts = Counter(n for n, a in zip(norm, alive) if a)
        return np.array([a and counts[n] > max_repeats for n, a in zip(norm, alive)], dtype=bool)
    return rule


def image_size(min_side: int = 0, max_aspect: Optional[float] = None) -> Rule:
    """Images whose shorter side is below `min_side` px or whose long/short side ratio exceeds `max_aspect`."""
    def rule(t: Table, alive: np.ndarray) -> np.ndarray:
        w, h = t.width.astype(np.float64), t.height.astype(np.float64)
        short, long_ = np.minimum(w, h), np.maximum(w, h)
        bad = short < min_side
        if max_aspect is not None:
            bad |= long_ > max_aspect * np.maximum(short, 1e-9)
        return bad & alive
    return rule


def clip_score(threshold: Optional[float] = None, top_fraction: Optional[float] = None) -> Rule:
    """Pairs whose image-text cosine is below `threshold`, or outside the best `top_fraction` of the alive rows
    (ties broken by table order, so exactly round(fraction * alive) rows stay)."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("clip_score takes a threshold or a top fraction, not both")

    def rule(t: Table, alive: np.ndarray) -> np.ndarray:
        if threshold is not None:
            return alive & ~(t.score >= threshold)
        idx = np.flatnonzero(alive)
        keep = int(round(top_fraction * len(idx)))
        order = idx[np.argsort(-t.score[idx], kind="stable")]
        bad = np.zeros(len(t), dtype=bool)
        bad[order[keep:]] = True
        return bad
    return rule
