import random
from collections import Counter

import pytest

from vlp.data import text_aug as T

CAPS = [
    "a small red circle above a blue square",
    "a photo of a green triangle on the left.",
    "there is a large yellow diamond in the middle of the picture",
    "red square",
]


@pytest.mark.parametrize("mode", T.MODES)
def test_deterministic_given_rng(mode):
    for cap in CAPS:
        a = [T.augment(cap, mode, random.Random(s)) for s in range(20)]
        b = [T.augment(cap, mode, random.Random(s)) for s in range(20)]
        assert a == b
        assert len(set(a)) > 1 or len(cap.split()) <= 2  # it does change things


def test_stopwords_removed_at_recipe_rate():
    cap = "a photo of a green triangle on the left of the picture"
    removed = 0
    n = 2000
    rng = random.Random(0)
    for _ in range(n):
        out, info = T.augment_words(cap, "stopwords", rng)
        if info["stopwords"]:
            removed += 1
            assert out == "photo green triangle left picture"
            assert not any(w in T.STOPWORDS for w in out.split())
        else:
            assert out == cap
    assert abs(removed / n - T.STOPWORD_P) < 0.04


def test_eda_op_frequencies_match_recipe():
    rng = random.Random(1)
    n = 5000
    counts = Counter(T.augment_words("a small red circle above a blue square", "eda", rng)[1]["eda"] for _ in range(n))
    for op, p in T.EDA_OPS:
        assert abs(counts[op] / n - p) < 0.03, (op, counts)


def test_eda_operations_do_what_they_say():
    words = "a small red circle above a blue square".split()
    rng = random.Random(3)
    syn = T.synonym_replacement(words, rng)
    changed = [(a, b) for a, b in zip(words, syn) if a != b]
    assert len(changed) == 1 and changed[0][1] in T.SYNONYMS[changed[0][0]]
    sw = T.random_swap(words, rng)
    assert sorted(sw) == sorted(words) and sw != words
    de = T.random_deletion(words, rng)
    assert len(de) == len(words) - 1
    assert T.random_deletion(["solo"], rng) == ["solo"]


def test_synonyms_keep_punctuation_and_case():
    rng = random.Random(0)
    out = T.synonym_replacement(["Photo."], rng, n=1)
    assert out[0].endswith(".") and out[0][0].isupper() and out[0][:-1].lower() in T.SYNONYMS["photo"]


@pytest.mark.parametrize("mode", T.MODES)
def test_never_empty(mode):
    rng = random.Random(0)
    for cap in ["a", "the of", "it", "x", "  the  ", "on the", "a small red circle"]:
        for _ in range(200):
            out = T.augment(cap, mode, rng)
            assert out.strip(), (cap, mode)
    assert T.augment("", "eda", rng) == ""


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        T.augment("a cat", "nope", random.Random(0))


def test_demo_captions_get_synonyms():
    from vlp.data import demo_world as W

    vocab = set(W.COLORS) | set(W.SHAPES) | set(W.SIZES) | {"left", "right", "top", "bottom", "photo"}
    assert vocab <= set(T.SYNONYMS)
