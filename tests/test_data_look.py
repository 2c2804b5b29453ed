"""A look at the data and at a run: inspect_shards --show / --contact-sheet / duplicate captions, and the
run-folder plot (loss panel first, headline metrics on a 0-1 axis with chance, geometry last)."""
from __future__ import annotations

import json
from collections import Counter

from data_tools import inspect_shards
from vlp.data.tario import read_shard


def test_show_contact_sheet_and_duplicate_captions(demo_data, tmp_path, capsys):
    from PIL import Image

    spec = demo_data["train_data"]
    sheet = tmp_path / "sheet.png"
    assert inspect_shards.main([spec, "--quiet", "--show", "3", "--contact-sheet", str(sheet),
                                "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    first = []
    captions = Counter()
    for url in inspect_shards.shard_urls(spec):
        for sample in read_shard(url, exts=["txt", "json"]):
            key, files = sample.key, sample.files
            captions[files["txt"].decode().strip()] += 1
            if len(first) < 3:
                first.append((key, files["txt"].decode().strip(), json.loads(files["json"])["rewrites"]))
    for key, cap, rewrites in first:
        assert f"--- {key}: {cap!r}" in out
        assert all(f"rewrite: {rw!r}" in out for rw in rewrites)
    dup = sum(captions.values()) - len(captions)
    assert f"duplicate captions: {dup} of {sum(captions.values())} samples" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["duplicate_captions"] == dup and len(report["shown"]) == 24 and "image" not in report["shown"][0]
    im = Image.open(sheet)
    assert im.size == (6 * 168, 4 * (160 + 4 + 12 * 4 + 8))    # 24 samples: 6 columns x 4 rows
    assert im.convert("L").getpixel((4 + 80, 4 + 80)) < 250    # a thumbnail, not the white page


def test_run_plot_layout():
    from vlp.eval.plot import draw
    from vlp.eval.report import progress

    results = []
    for step, acc, gap in ((100, 0.30, 0.80), (200, 0.302, 0.78)):
        results.append({"dataset": "wds/c", "task": "zeroshot_classification",
                        "metrics": {"acc1": acc, "geometry/modality_gap": gap, "acc5": 0.9},
                        "vlp": {"step": step, "n_classes": 8, "n_images": 80}})
        results.append({"dataset": "wds/r", "task": "zeroshot_retrieval",
                        "metrics": {"text_retrieval_recall@1": acc / 2, "image_retrieval_mean_rank": 12.0},
                        "vlp": {"step": step, "n_images": 40, "n_texts": 120}})
    fig = draw(results, [(1, 5.0), (100, 4.0), (200, 3.5)], progress)
    axes = [ax for ax in fig.axes if ax.get_title()]
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == "training loss"
    assert titles[1].startswith("acc1") and titles[2].startswith("acc5") and titles[3].startswith("image→text R@1")
    assert titles[-1] == "geometry/modality_gap" and titles[-2] == "image_retrieval_mean_rank"
    acc1 = axes[1]
    assert acc1.get_ylim() == (0, 1.02)                       # 0.300 -> 0.302 drawn on the full scale
    dashed = [ln for ln in acc1.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_ydata()[0] for ln in dashed] == [1 / 8]  # chance: 1 of 8 classes
    r1 = [ln for ln in axes[3].get_lines() if ln.get_linestyle() == "--"]
    assert r1[0].get_ydata()[0] == 1 / 40
    assert axes[-1].get_ylim()[0] == 0                         # the gap axis starts at 0
