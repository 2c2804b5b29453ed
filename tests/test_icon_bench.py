"""The icon benchmark builder on small stand-in npm tarballs (same file layout as the real packages).

Checks the splits hold (no held-out concept or style reaches training), the eval sets open in vlp's
evaluator and in CLIP_benchmark's reader layout, and the images are the drawn icons.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cairosvg", exc_type=ImportError)

from data_tools import icon_sources as S  # noqa: E402
from data_tools import make_icon_bench as B  # noqa: E402
from vlp.data.tario import read_shard  # noqa: E402

CONCEPTS = [f"thing{c}" for c in "abcdefghijklmnop"]  # 16 concepts drawn by every set


def _body(i: int, filled: bool) -> str:
    r = 3 + i % 6
    paint = 'fill="currentColor"' if filled else 'fill="none" stroke="currentColor" stroke-width="2"'
    return f'<rect x="{12 - r}" y="{12 - r // 2}" width="{2 * r}" height="{r}" {paint}/>'


def _pack(cache: Path, spec: str, files: dict[str, bytes]) -> None:
    with tarfile.open(cache / S.tarball_name(spec), "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _fake_cache(cache: Path) -> None:
    cache.mkdir(parents=True)
    for prefix, (spec, rules) in S.SETS.items():
        icons = {}
        for k, c in enumerate(CONCEPTS):
            for suffix, style in rules:
                icons[c + suffix] = {"body": _body(k, filled=style in ("fill", "filled", "bold"))}
        data = {"prefix": prefix, "icons": icons, "width": 24, "height": 24,
                "aliases": {"other-name": {"parent": CONCEPTS[0]}}}
        meta = {"categories": {"Things": [CONCEPTS[1]]}}
        _pack(cache, spec, {"icons.json": json.dumps(data).encode(), "metadata.json": json.dumps(meta).encode()})
    entries = "".join(f'  {{\n    name: "{c}",\n    categories: [e.X],\n    figma_category: a.{"OBJ" if k % 2 else "ARR"},'
                      f'\n    tags: [\n      "*new*",\n      "tag{k}"\n    ],\n  }},\n' for k, c in enumerate(CONCEPTS))
    js = ('var e = /* @__PURE__ */ ((i) => (i.X = "x", i))(e || {}), a = /* @__PURE__ */ ((i) => '
          '(i.ARR = "arrows", i.OBJ = "objects", i))(a || {});\nconst n = [\n' + entries + "];\n")
    _pack(cache, S.PHOSPHOR_CATALOG, {"dist/index.mjs": js.encode()})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iconbench")
    _fake_cache(tmp / "cache")
    summary = B.build(tmp / "out", tmp / "cache", train_size=10_000, heldout_concepts=4, style_classes=5,
                      per_class=2, image_size=32, progress=False)
    return tmp / "out", summary


def _train_records(out: Path) -> list[dict]:
    recs = []
    for shard in sorted((out / "train").glob("*.tar")):
        for files in (s.files for s in read_shard(str(shard))):
            recs.append({**json.loads(files["json"]), "txt": files["txt"].decode(), "jpg": files["jpg"]})
    return recs


def test_sources_read_styles_tags_and_catalogue(tmp_path):
    _fake_cache(tmp_path / "c")
    icons = S.load_icons(tmp_path / "c")
    assert len(icons) == len(CONCEPTS) * sum(len(rules) for _, rules in S.SETS.values())
    styles = {i.style for i in icons}
    assert {"ph-duotone", "ph-regular", "mdi-outline", "mdi-filled", "tabler-filled", "lucide-outline"} <= styles
    a = next(i for i in icons if i.style == "mdi-filled" and i.concept == CONCEPTS[0])
    assert a.tags == ["other name"]                              # an alias becomes a tag of its parent
    b = next(i for i in icons if i.style == "ph-bold" and i.concept == CONCEPTS[1])
    assert (b.category, b.tags) == ("objects", ["tag1"])         # Phosphor's catalogue, "*new*" dropped
    assert next(i for i in icons if i.source == "ri" and i.name == CONCEPTS[1]).categories == ["Things"]


def test_splits_keep_heldout_concepts_and_styles_out_of_training(bench):
    out, summary = bench
    recs = _train_records(out)
    held = set(summary["heldout_concepts"])
    assert len(held) == 4 and len(recs) == summary["train"]["samples"] > 0
    assert not {r["concept"] for r in recs} & held
    assert not {r["style"] for r in recs} & set(B.HELDOUT_STYLES)
    assert {r["style"] for r in recs} == set(summary["train"]["styles"])
    r = next(r for r in recs if r["style"] == "ph-bold")
    assert r["txt"] == r["concept"] + " bold" and f"{r['concept']} icon" in r["rewrites"]
    names = (out / "eval/icons_unseen_concepts/classnames.txt").read_text().split("\n")[:-1]
    assert sorted(names) == sorted(held)


def test_eval_sets_open_in_vlp_and_follow_clip_benchmark_layout(bench):
    from vlp.eval.datasets import open_eval_set

    out, summary = bench
    for name, info in summary["eval"].items():
        root = Path(info["path"])
        kind = (root / "dataset_type.txt").read_text().strip()
        assert kind == ("retrieval" if name == "icons_retrieval" else "zeroshot_classification")
        assert int((root / "test/nshards.txt").read_text()) == len(list((root / "test").glob("*.tar")))
        es = open_eval_set(str(root))
        assert len(es.samples()) == info["samples"] > 0
    es = open_eval_set(str(out / "eval/icons_unseen_styles"))
    assert len(es.classnames) == 5 and all(int(s.target) < 5 for s in es.samples())
    heldout_icons = [i for i in S.load_icons(out.parent / "cache") if i.style in B.HELDOUT_STYLES]
    assert {i.concept for i in heldout_icons} >= set(es.classnames)


def test_rendered_icon_is_the_drawing_black_on_white():
    icon = S.Icon("x", "x-fill", "box", "box", '<rect x="6" y="6" width="12" height="12" fill="currentColor"/>',
                  (0, 0, 24, 24))
    from PIL import Image

    im = np.asarray(Image.open(io.BytesIO(B.render_png(icon, 48))))
    assert im.shape == (48, 48, 3)
    assert im[24, 24].max() < 10 and im[2, 2].min() > 245      # black square in the middle, white margin
    dark = np.argwhere(im.max(axis=2) < 128)
    # 12 of 24 units drawn inside a 76% window: 12/24*0.76*48 ~ 18 px wide, centred
    assert 16 <= np.ptp(dark[:, 0]) + 1 <= 20 and abs(dark[:, 1].mean() - 23.5) < 1
