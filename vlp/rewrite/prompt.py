"""LaCLIP's in-context prompt, per-caption seeds, and the quality guards applied to every rewrite."""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from typing import Sequence

from vlp.rewrite.pools import MARKER

INSTRUCTION = "write image captions differently,"
N_EXAMPLES = 3
MAX_CAPTION_CHARS = 300


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from the parts (run seed, source name, caption index): independent of batching."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def build_prompt(caption: str, pairs: Sequence[tuple[str, str]], rng: random.Random,
                 n_examples: int = N_EXAMPLES) -> tuple[str, list[tuple[str, str]]]:
    """LaCLIP's prompt: the instruction line, `n_examples` pairs drawn at random from the pool, then `caption =>`.
    Returns the prompt and the pairs used (the guards compare generations against them)."""
    chosen = rng.sample(list(pairs), min(n_examples, len(pairs)))
    caption = " ".join(caption.split())[:MAX_CAPTION_CHARS]
    blocks = [INSTRUCTION] + [f"{s} {MARKER} {t}" for s, t in chosen] + [f"{caption} {MARKER}"]
    return "\n\n".join(blocks), chosen


def cut_generation(text: str) -> str:
    """Keep the text up to the first newline, without surrounding whitespace."""
    return text.split("\n", 1)[0].strip()


# ---------------------------------------------------------------- guards

GUARD_REASONS = ("empty", "marker", "prompt_echo", "too_long", "repetitive")
MAX_WORDS = 40  # an over-long rewrite has more than max(MAX_WORDS, LONG_RATIO * caption words) words
LONG_RATIO = 3.0
MAX_CHARS = 400
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # all control characters, line breaks included
_CHAR_LOOP = re.compile(r"(.{2,}?)\1{2,}")
_NORM = re.compile(r"[^\w]+")


def one_line(text: str) -> str:
    """No character that any reader could take as a line break (line-aligned outputs must stay aligned)."""
    return " ".join(_LINE_BREAKS.sub(" ", text).split())


def _norm(text: str) -> str:
    return _NORM.sub(" ", text.lower()).strip()


def degenerate_reason(text: str, caption: str, used_pairs: Sequence[tuple[str, str]] = ()) -> str | None:
    """Why a generated rewrite is unusable (one of GUARD_REASONS), or None when it is fine."""
    if not any(ch.isalnum() for ch in text):
        return "empty"
    if MARKER in text:
        return "marker"
    norm = _norm(text)
    echoes = {_norm(INSTRUCTION)} | {_norm(s) for pair in used_pairs for s in pair}
    if norm in echoes or _norm(INSTRUCTION) in norm:
        return "prompt_echo"
    words = text.split()
    if len(text) > MAX_CHARS or len(words) > max(MAX_WORDS, LONG_RATIO * len(caption.split())):
        return "too_long"
    low = [w.lower() for w in words]
    for n in (1, 2, 3, 4):  # a run of 1 to 4 words said three times in a row
        if any(low[i:i + n] == low[i + n:i + 2 * n] == low[i + 2 * n:i + 3 * n] for i in range(len(low) - 3 * n + 1)):
            return "repetitive"
    if len(low) >= 8 and len(set(low)) / len(low) < 0.4:
        return "repetitive"
    loops = sum(len(m.group(0)) for m in _CHAR_LOOP.finditer(text) if len(m.group(0)) >= 9)
    if loops >= 0.5 * len(text):
        return "repetitive"
    trigrams = Counter(tuple(low[i:i + 3]) for i in range(len(low) - 2))
    if trigrams and max(trigrams.values()) >= 3:
        return "repetitive"
    return None


def guard(text: str, caption: str, used_pairs: Sequence[tuple[str, str]] = ()) -> tuple[str, str | None]:
    """(rewrite to keep, reason it was replaced by the caption or None)."""
    text = one_line(text)
    reason = degenerate_reason(text, caption, used_pairs)
    if reason is not None:
        return one_line(caption), reason
    return text, None
