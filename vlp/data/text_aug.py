"""Caption augmentation after Fini et al. ("Improved baselines for vision-language pre-training").

    augment(text, mode, rng) -> str      mode: "stopwords", "eda" or "stopwords+eda"

- `stopwords`: with probability `STOPWORD_P` (0.8) the caption loses all its stopwords
  (a small built-in English list).
- `eda`: exactly one EDA operation, picked with probabilities synonym 0.4 / swap 0.4 /
  deletion 0.2. Each operation touches `max(1, round(EDA_ALPHA * n_words))` words:
  synonym replacement uses a small built-in table (colours, shapes, positions, sizes and
  common photo words, so it does something on the demo data); swap exchanges two words;
  deletion removes words (never all of them).
- `stopwords+eda`: the first, then the second.

All randomness comes from the `rng` argument, so results are reproducible. The result is
never empty: when an operation would leave nothing, the input is returned unchanged.
"""
from __future__ import annotations

import random
import re

MODES = ("stopwords", "eda", "stopwords+eda")
STOPWORD_P = 0.8
EDA_OPS = (("synonym", 0.4), ("swap", 0.4), ("deletion", 0.2))
EDA_ALPHA = 0.1

# A small English stopword list (function words only: content words like colours and shapes stay).
STOPWORDS = frozenset("""
a an the and or but nor so yet of to in on at by for with from into onto upon over under
about above below between among through during before after up down out off than then
is are was were be been being am do does did has have had having will would shall should can could
may might must it its it's this that these those there here which who whom whose what when where
while as if i me my we our you your he him his she her they them their one some any each
very just also too not no only own same such both all few more most other
""".split())

# A small synonym table written for vlp: symmetric groups; every word maps to the others in its group.
_SYNONYM_GROUPS = [
    # colours
    ["red", "crimson", "scarlet"], ["green", "emerald"], ["blue", "azure", "navy"],
    ["yellow", "golden"], ["purple", "violet"], ["orange", "amber"], ["white", "pale"],
    ["black", "dark"], ["grey", "gray"],
    # shapes
    ["circle", "disc", "round shape"], ["square", "box", "block"], ["triangle", "wedge"],
    ["diamond", "rhombus"], ["cross", "plus sign"], ["shape", "figure", "form"],
    # sizes
    ["small", "little", "tiny"], ["large", "big", "huge"],
    # positions and relations
    ["left", "left side"], ["right", "right side"], ["top", "upper part"], ["bottom", "lower part"],
    ["center", "centre", "middle"], ["above", "over"], ["below", "under", "beneath"],
    # common photo words
    ["photo", "picture", "image", "snapshot"], ["drawing", "illustration", "sketch"],
    ["background", "backdrop"], ["showing", "depicting", "displaying"], ["colored", "coloured", "tinted"],
    ["object", "item", "thing"], ["two", "a pair of"], ["man", "guy", "gentleman"], ["woman", "lady"],
    ["child", "kid"], ["dog", "puppy", "pooch"], ["cat", "kitty"], ["car", "automobile", "vehicle"],
    ["house", "home"], ["street", "road"], ["beautiful", "lovely", "pretty"], ["view", "scene", "vista"],
    ["standing", "posing"], ["sitting", "seated"], ["walking", "strolling"], ["people", "persons", "folks"],
    ["near", "close to", "next to"], ["city", "town"], ["building", "structure"], ["tree", "plant"],
    ["sea", "ocean"], ["sky", "heavens"], ["food", "meal", "dish"], ["happy", "cheerful", "smiling"],
]
SYNONYMS: dict[str, list[str]] = {}
for _group in _SYNONYM_GROUPS:
    for _w in _group:
        SYNONYMS.setdefault(_w, []).extend(x for x in _group if x != _w and x not in SYNONYMS[_w])
del _group, _w

_TOKEN = re.compile(r"\S+")
_STRIP = re.compile(r"^[^\w']+|[^\w']+$")


def _bare(word: str) -> str:
    """Lower-case word without surrounding punctuation (for lookups)."""
    return _STRIP.sub("", word.lower())


def remove_stopwords(words: list[str]) -> list[str]:
    """The words that are not stopwords (punctuation around a word does not hide it)."""
    return [w for w in words if _bare(w) not in STOPWORDS]


def _n_touch(n_words: int) -> int:
    return max(1, int(round(EDA_ALPHA * n_words)))


def synonym_replacement(words: list[str], rng: random.Random, n: int | None = None) -> list[str]:
    """Replace up to n distinct words that have a synonym in the table (keeping their punctuation)."""
    n = _n_touch(len(words)) if n is None else n
    candidates = [i for i, w in enumerate(words) if _bare(w) in SYNONYMS]
    rng.shuffle(candidates)
    out = list(words)
    for i in candidates[:n]:
        w = out[i]
        bare = _bare(w)
        syn = rng.choice(SYNONYMS[bare])
        if w[:1].isupper():
            syn = syn[:1].upper() + syn[1:]
        start = w.lower().find(bare)
        out[i] = w[:start] + syn + w[start + len(bare):]
    return out


def random_swap(words: list[str], rng: random.Random, n: int | None = None) -> list[str]:
    """Swap two random positions, n times (no-op for fewer than two words)."""
    n = _n_touch(len(words)) if n is None else n
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], rng: random.Random, n: int | None = None) -> list[str]:
    """Delete n random words, always keeping at least one."""
    n = _n_touch(len(words)) if n is None else n
    n = min(n, len(words) - 1)
    if n <= 0:
        return list(words)
    drop = set(rng.sample(range(len(words)), n))
    return [w for i, w in enumerate(words) if i not in drop]


_OPS = {"synonym": synonym_replacement, "swap": random_swap, "deletion": random_deletion}


def pick_eda_op(rng: random.Random) -> str:
    """One EDA operation name, drawn with the recipe's probabilities."""
    r = rng.random()
    acc = 0.0
    for name, p in EDA_OPS:
        acc += p
        if r < acc:
            return name
    return EDA_OPS[-1][0]


def eda(words: list[str], rng: random.Random) -> tuple[list[str], str]:
    """Apply one EDA operation; returns the new words and the operation's name."""
    op = pick_eda_op(rng)
    return _OPS[op](words, rng), op


def augment_words(text: str, mode: str, rng: random.Random, stopword_p: float = STOPWORD_P) -> tuple[str, dict]:
    """`augment` plus what was done: {"stopwords": bool, "eda": op name or None}."""
    if mode not in MODES:
        raise ValueError(f"text augmentation mode must be one of {', '.join(MODES)} (got {mode!r})")
    words = _TOKEN.findall(text)
    info: dict = {"stopwords": False, "eda": None}
    if not words:
        return text, info
    if "stopwords" in mode and rng.random() < stopword_p:
        kept = remove_stopwords(words)
        if kept:
            words = kept
            info["stopwords"] = True
    if "eda" in mode:
        new, info["eda"] = eda(words, rng)
        if new:
            words = new
    out = " ".join(words).strip()
    return (out if out else text), info


def augment(text: str, mode: str, rng: random.Random) -> str:
    """Augment one caption (see the module docstring); never returns an empty string for non-empty input."""
    return augment_words(text, mode, rng)[0]
