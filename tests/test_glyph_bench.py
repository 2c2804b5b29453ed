"""The glyph benchmark builder on stand-in Fontsource tarballs made from the fonts matplotlib ships.

The stand-ins have the real packages' layout (`package/files/<id>-<subset>-<weight>-<style>.woff`, one WOFF
per unicode subset, cut with fontTools' subsetter), with gaps on purpose: one family ships no Greek file and
one family's Latin file lacks 'ß'. Checks the splits hold (no held-out family or character reaches training,
validation pairs stay out of it), captions are the Unicode names, no missing-glyph box is drawn, and the eval
sets open in vlp's evaluator and in CLIP_benchmark's own reader.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from data_tools import glyph_sources as G  # noqa: E402
from data_tools import make_glyph_bench as B  # noqa: E402
from data_tools.npm_cache import tarball_name  # noqa: E402
from vlp.data.tario import read_shard  # noqa: E402

TTF = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# family id (two of them held out) -> {variant: matplotlib font}
FAKES = {
    "roboto": {"400-normal": "DejaVuSans.ttf", "700-normal": "DejaVuSans-Bold.ttf"},
    "pt-serif": {"400-normal": "DejaVuSerif.ttf"},
    "roboto-mono": {"400-normal": "DejaVuSansMono.ttf"},
    "lora": {"400-normal": "STIXGeneral.ttf", "400-italic": "STIXGeneralItalic.ttf"},
    "ubuntu": {"400-normal": "DejaVuSerif-Bold.ttf"},
    "lobster": {"400-normal": "STIXGeneralBol.ttf"},
}
SUBSET_RANGES = {"latin": [(0x20, 0xFF)], "latin-ext": [(0x100, 0x24F)], "greek": [(0x370, 0x3FF)],
                 "cyrillic": [(0x400, 0x45F)]}
NO_GREEK, NO_SHARP_S = "pt-serif", "roboto-mono"
SIZES = {"train_size": 600, "heldout_concepts": 10, "style_classes": 12, "val_classes": 8, "per_class": 2,
         "category_per_class": 4}


def _woff(ttf: Path, cps: list[int]) -> bytes:
    from fontTools import subset
    from fontTools.ttLib import TTFont

    logging.getLogger("fontTools.subset").setLevel(logging.ERROR)   # "FFTM NOT subset" per DejaVu file
    font = TTFont(str(ttf))
    sub = subset.Subsetter(subset.Options(notdef_outline=True, layout_features=[]))
    sub.populate(unicodes=cps)
    sub.subset(font)
    font.flavor = "woff"
    buf = io.BytesIO()
    font.save(buf)
    return buf.getvalue()


def _fake_cache(cache: Path) -> None:
    cache.mkdir(parents=True)
    for family, variants in FAKES.items():
        with tarfile.open(cache / tarball_name(G.spec(family)), "w:gz") as tf:
            for variant, ttf in variants.items():
                for subset, ranges in SUBSET_RANGES.items():
                    if subset == "greek" and family == NO_GREEK:
                        continue
                    cps = [c for lo, hi in ranges for c in range(lo, hi + 1)
                           if not (family == NO_SHARP_S and c == ord("ß"))]
                    data = _woff(TTF / ttf, cps)
                    info = tarfile.TarInfo(f"package/files/{family}-{subset}-{variant}.woff")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("fontsource") / "cache"
    _fake_cache(out)
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("glyphbench") / "out"
    return out, B.build(out, cache, image_size=32, families=list(FAKES), progress=False, **SIZES)


def _records(out: Path) -> list[dict]:
    recs = []
    for shard in sorted((out / "train").glob("*.tar")):
        for files in (s.files for s in read_shard(str(shard))):
            recs.append({**json.loads(files["json"]), "txt": files["txt"].decode()})
    return recs


def test_splits_keep_heldout_families_characters_and_val_pairs_out_of_training(bench):
    out, summary = bench
    recs = _records(out)
    assert len(recs) == summary["train"]["samples"] == SIZES["train_size"]
    held = set(summary["heldout_concepts"])
    assert len(held) == SIZES["heldout_concepts"] and set(summary["heldout_styles"]) == {"ubuntu", "lobster"}
    assert not {r["style"] for r in recs} & {"ubuntu", "lobster"}
    assert not {r["concept"] for r in recs} & held
    val = {tuple(p) for p in summary["val_pairs"]}
    assert len(val) == SIZES["val_classes"] * SIZES["per_class"] and not {(r["concept"], r["style"]) for r in recs} & val
    # every word of a held-out character's name is trained on (in another character's caption)
    trained_words = {w for r in recs for w in r["txt"].split()}
    assert all(set(G.name(c).split()) <= trained_words for c in held)
    # the categories are spread: more than one script or class among the held-out characters
    assert len({G.category(c) for c in held}) >= 3


def test_captions_are_unicode_names_and_no_tofu_is_drawn(bench):
    out, summary = bench
    recs = _records(out)
    for r in recs:
        assert r["txt"] == unicodedata.name(r["concept"]).lower() and r["script"] == G.category(r["concept"])
        assert r["rewrites"] and all(isinstance(x, str) and x for x in r["rewrites"])
    a = next(r for r in recs if r["txt"].startswith("latin small letter") and " with " in r["txt"])
    assert f"the letter {a['concept']}" in a["rewrites"] and a["txt"].replace("latin ", "").replace("letter ", "") \
        in a["rewrites"]
    # a family without a Greek file draws no Greek; a Latin file without 'ß' does not draw it
    assert not [r for r in recs if r["style"] == NO_GREEK and r["script"] == "greek letter"]
    assert not [r for r in recs if r["style"] == NO_SHARP_S and r["concept"] == "ß"]
    assert [r for r in recs if r["style"] != NO_GREEK and r["script"] == "greek letter"]
    names = (out / "eval/glyphs_unseen_concepts/classnames.txt").read_text().splitlines()
    assert names == [G.name(c) for c in summary["heldout_concepts"]]


def test_rendered_glyphs_are_not_the_missing_glyph_box(cache):
    from PIL import Image

    faces = G.load_faces(cache, ["roboto-mono", "lora"])
    mono = next(f for f in faces if f.family == "roboto-mono")
    assert not mono.draws("ß") and mono.draws("ä")

    def pixels(face, ch):
        return np.asarray(Image.open(io.BytesIO(G.render_png(face, ch, 48))).convert("L"))

    for face in faces:
        latin = face.files[0][0]
        tofu = type(face)(face.family, face.genre, face.variant, [(latin, frozenset({0xE000}))])
        box = pixels(tofu, "\ue000")        # a code point the font lacks: the .notdef drawing
        for ch in "aßĂΩж7&":
            if face.draws(ch):
                im = pixels(face, ch)
                assert im.min() < 64 and im[0].min() > 200 and not np.array_equal(im, box), (face.family, ch)
    # capitals stand higher than small letters in the same face (the cap height is fixed per face)
    top = lambda im: np.argwhere(im < 128)[:, 0].min()  # noqa: E731
    lora = faces[1]
    assert top(pixels(lora, "x")) > top(pixels(lora, "X")) + 3


def test_eval_sets_open_in_vlp_and_clip_benchmark(bench):
    from vlp.eval.datasets import open_eval_set

    out, summary = bench
    assert list(summary["eval"]) == ["glyphs_val", "glyphs_unseen_concepts", "glyphs_unseen_styles",
                                     "glyphs_category", "glyphs_retrieval"]
    for name, info in summary["eval"].items():
        root = Path(info["path"])
        kind = (root / "dataset_type.txt").read_text().strip()
        assert kind == ("retrieval" if name == "glyphs_retrieval" else "zeroshot_classification")
        es = open_eval_set(str(root))
        assert len(es.samples()) == info["samples"] > 0
    es = open_eval_set(str(out / "eval/glyphs_val"))
    assert es.classnames == [G.name(p[0]) for p in summary["val_pairs"][::SIZES["per_class"]]]
    cats = (out / "eval/glyphs_category/classnames.txt").read_text().splitlines()
    assert set(cats) <= {"latin letter", "greek letter", "cyrillic letter", "digit", "punctuation mark", "symbol"}
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.datasets.builder import build_dataset

    root = out / "eval/glyphs_unseen_styles"
    ds = build_dataset("wds/" + root.name, root=str(root), transform=lambda im: np.asarray(im), split="test",
                       task="zeroshot_classification")
    got = [(img.shape, int(t)) for img, t in ds]
    assert len(got) == summary["eval"]["glyphs_unseen_styles"]["samples"]
    assert all(shape == (32, 32, 3) and 0 <= t < len(ds.classes) for shape, t in got)


def test_damaged_tarball_or_font_is_one_line_error(tmp_path, cache):
    import shutil

    from data_tools.npm_cache import SourceError

    shutil.copytree(cache, tmp_path / "c")
    tgz = tmp_path / "c" / tarball_name(G.spec("roboto"))
    data = bytearray(tgz.read_bytes())
    tgz.write_bytes(bytes(data[: len(data) // 2]))                   # a download cut short
    with pytest.raises(SourceError, match="fontsource-roboto-5.3.0.tgz: cannot read the tarball"):
        G.load_faces(tmp_path / "c", ["roboto"])
    with tarfile.open(tgz, "w:gz") as tf:                            # a file that is no font
        info = tarfile.TarInfo("package/files/roboto-latin-400-normal.woff")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"wOFF"))
    with pytest.raises(SourceError, match="roboto-latin-400-normal.woff: not a readable font"):
        G.load_faces(tmp_path / "c", ["roboto"])
    with pytest.raises(SourceError, match="unknown font families"):
        G.load_faces(tmp_path / "c", ["comic-sans"])
