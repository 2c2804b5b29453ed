"""LaCLIP caption sampling and the text-augmentation wiring."""
from __future__ import annotations

import random
import sys
import types
from collections import Counter

from tests.test_data_fixtures import IdTokenizer, cfg, collect, preprocess, write_shards
from vlp.data.captions import pick_caption
from vlp.data.pipeline import build_train_loader


def test_pick_is_uniform_and_short_rewrites_fall_back():
    rng = random.Random(0)
    rewrites = ["a first rewrite", "second rewrite here", "one"]
    n = 20000
    c = Counter(pick_caption("the original caption", rewrites, rng) for _ in range(n))
    # original: its own quarter plus the one-word rewrite's quarter
    assert abs(c["the original caption"] / n - 0.5) < 0.02
    assert abs(c["a first rewrite"] / n - 0.25) < 0.02
    assert abs(c["second rewrite here"] / n - 0.25) < 0.02
    assert "one" not in c
    assert pick_caption("orig text", [], rng) == "orig text"


def test_loader_draws_rewrites_uniformly(tmp_path):
    write_shards(tmp_path / "sh", 64, 16, rewrites=3)
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=8, workers=2, use_rewrites=True)
    L = build_train_loader(c, preprocess(), IdTokenizer())
    variants = Counter()
    for epoch in range(4):
        L.set_epoch(epoch)
        for _, t in collect(L):
            variants.update(int(v) for v in t[:, 1])
    total = sum(variants.values())
    assert total == 256 and set(variants) == {0, 1, 2, 3}
    for v in range(4):
        assert abs(variants[v] / total - 0.25) < 0.09, variants
    # without --use-rewrites only the original caption is used
    c.use_rewrites = False
    assert {int(v) for _, t in collect(build_train_loader(c, preprocess(), IdTokenizer())) for v in t[:, 1]} == {0}


def test_text_aug_is_applied_through_text_aug_module(tmp_path, monkeypatch):
    calls = []

    def augment(text, mode, rng):
        calls.append(mode)
        assert isinstance(rng, random.Random)
        return text + " AUG"

    fake = types.ModuleType("vlp.data.text_aug")
    fake.augment = augment
    monkeypatch.setitem(sys.modules, "vlp.data.text_aug", fake)
    write_shards(tmp_path / "sh", 16, 8)
    c = cfg(str(tmp_path / "sh" / "{00000..00001}.tar"), batch_size=8, workers=0, text_aug="stopwords+eda")
    out = collect(build_train_loader(c, preprocess(), IdTokenizer()))
    assert all(int(f) == 1 for _, t in out for f in t[:, 3])
    assert set(calls) == {"stopwords+eda"}
