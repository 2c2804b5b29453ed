"""Token ids of class x template prompts, composed from each template's and each class name's own tokens.

A zero-shot classifier tokenises C x T prompts ("a photo of a {c}.") that are built from only C + T distinct
pieces, and open_clip's `SimpleTokenizer` spends most of its time per *string* (ftfy, HTML unescaping,
regex), not per piece. For printable-ASCII text without `&` or `<` that cleaning changes nothing but
whitespace and case, per character, so a prompt's ids are its pieces' ids joined, as long as no regex
token could span a joint: a letter next to a letter, punctuation next to punctuation, or a `'` that could
open a contraction (`'s`, `'re`, ...). Prompts that fail any of these checks, other tokenizers, and per-class
prompt lists go through the tokenizer itself, so the result always equals `tokenizer(prompts)`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

_SLOT = "\x00"   # stands in for the class name when a template is split into its text before and after it


def tokenize_prompts(tokenizer: Callable, prompts: list[str], classnames: list[str], templates) -> torch.Tensor:
    """`tokenizer(prompts)` for prompts filled class by class (`fill_templates` order), composed where exact."""
    encode = _composable(tokenizer)
    splits = [_split(t) for t in templates] if encode is not None and isinstance(templates, (list, tuple)) else None
    if not splits or len(prompts) != len(classnames) * len(splits):
        return tokenizer(prompts)
    ctx = tokenizer.context_length
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    pieces: dict[str, Optional[list[int]]] = {}

    def ids(text: str) -> Optional[list[int]]:
        """The piece's ids, or None when it is not plain text (then no prompt containing it is composed)."""
        if text not in pieces:
            pieces[text] = encode(text) if _plain(text) else None
        return pieces[text]

    def composed(p: str, c: str, split: Optional[tuple[str, str]]) -> Optional[list[int]]:
        if split is None or p != split[0] + c + split[1] or not _joinable(split[0], c, split[1]):
            return None
        parts = [ids(split[0]), ids(c), ids(split[1])]
        if any(x is None for x in parts):
            return None
        row = [sot, *parts[0], *parts[1], *parts[2], eot]
        if len(row) > ctx:   # the tokenizer's truncation: keep the first ctx ids, the last one set to EOT
            row = row[:ctx]
            row[-1] = eot
        return row + [0] * (ctx - len(row))

    rows: list[Optional[list[int]]] = [composed(p, classnames[i // len(splits)], splits[i % len(splits)])
                                       for i, p in enumerate(prompts)]
    rest = [i for i, r in enumerate(rows) if r is None]
    if len(rest) == len(prompts):
        return tokenizer(prompts)
    for i in rest:
        rows[i] = [0] * ctx
    out = torch.tensor(rows, dtype=torch.long)
    if rest:
        out[rest] = tokenizer([prompts[i] for i in rest])
    return out


def _composable(tokenizer) -> Optional[Callable[[str], list[int]]]:
    """The tokenizer's per-text `encode` when it is open_clip's BPE tokenizer with context-free cleaning."""
    from open_clip import tokenizer as T

    if type(tokenizer) is not T.SimpleTokenizer or tokenizer.reduction_fn is not None:
        return None
    if tokenizer.clean_fn not in (T._clean_lower, T._clean_whitespace):
        return None
    return tokenizer.encode


def _split(template) -> Optional[tuple[str, str]]:
    """(text before, text after) the class name, or None when the template does not use it exactly once."""
    try:
        filled = template(_SLOT) if callable(template) else template.format(c=_SLOT)
    except Exception:
        return None
    if not isinstance(filled, str) or filled.count(_SLOT) != 1:
        return None
    before, after = filled.split(_SLOT)
    return before, after


def _plain(text: str) -> bool:
    """Printable ASCII with nothing ftfy or html.unescape would change and no special-token text."""
    return text.isascii() and text.isprintable() and "&" not in text and "<" not in text


def _joinable(*parts: str) -> bool:
    """No regex token can span a joint between consecutive non-empty parts."""
    parts = [s for s in parts if s]
    return all(_safe_joint(a[-1], b[0]) for a, b in zip(parts, parts[1:]))


def _safe_joint(left: str, right: str) -> bool:
    """No token of open_clip's pattern (`'s|'t|'re|'ve|'m|'ll|'d|letters+|digit|punctuation+`) can cover both
    `left` and `right`."""
    if left == " " or right == " ":
        return True
    if left == "'":
        return False
    if left.isalpha() and right.isalpha():
        return False
    return left.isalnum() or right.isalnum()   # else two punctuation marks, which one run would join
