"""Compositional hard negatives: the metric against a hand count, SugarCrepe's JSON and the CSV form read
alike, the demo-world generator's negatives, and one-line errors."""
from __future__ import annotations

import json
import random

import pytest
import torch

from vlp.eval import EvalError, open_eval_set
from vlp.eval.compositional import selection_metrics


def test_metric_equals_a_hand_count():
    # 4 images in 2-d; captions chosen so the outcome of each image is known by hand
    img = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0.6, 0.8]])
    txt = torch.tensor([
        [1.0, 0], [0, 1],                 # image 0: positive 1.0 vs 0.0          -> correct
        [1.0, 0], [0, 1], [0.6, 0.8],     # image 1: positive 0.0 vs 1.0, 0.8    -> wrong
        [0.6, 0.8], [0.6, 0.8],           # image 2: positive 0.6 vs 0.6 (tie)   -> correct (tie to the positive)
        [0.6, 0.8], [1.0, 0], [0, 1],     # image 3: positive 1.0 vs 0.6, 0.8    -> correct
    ])
    t2i = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    pos = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    m = selection_metrics(img, txt, t2i, pos, ["swap_att", "replace_obj", "swap_att", "replace_rel"])
    assert m["acc"] == 0.75
    assert m["acc/swap_att"] == 1.0 and m["acc/replace_obj"] == 0.0 and m["acc/replace_rel"] == 1.0
    assert m["acc/replace"] == 0.5 and m["acc/attribute"] == 1.0 and m["acc/relation"] == 1.0


def _write_images(root, n):
    from vlp.data import demo_world as W

    rng = random.Random(0)
    for i in range(n):
        (root / f"{i}.png").write_bytes(W.encode_png(W.render(W.random_scene(rng), 32, rng)))


def test_json_and_csv_forms_read_alike(tmp_path):
    _write_images(tmp_path, 3)
    sc = {"7": {"filename": "0.png", "caption": "a red circle", "negative_caption": "a blue circle"},
          "9": {"filename": "1.png", "caption": "a cat", "negative_caption": ["a dog", "a cow"]}}
    (tmp_path / "replace_obj.json").write_text(json.dumps(sc))
    (tmp_path / "set.csv").write_text("filename,caption,negative_caption,negative_caption_2,subset\n"
                                      "0.png,a red circle,a blue circle,,replace_obj\n"
                                      "1.png,a cat,a dog,a cow,replace_obj\n")
    a = open_eval_set(str(tmp_path / "replace_obj.json"))
    b = open_eval_set(str(tmp_path / "set.csv"))
    assert a.task == b.task == "image_caption_selection"
    assert [s.target for s in a.samples()] == [s.target for s in b.samples()] == \
        [["a red circle", "a blue circle"], ["a cat", "a dog", "a cow"]]
    assert [s.key.split("/")[0] for s in a.samples()] == ["replace_obj"] * 2
    assert a.samples()[1].path == str(tmp_path / "1.png")
    # a plain retrieval CSV is still retrieval
    (tmp_path / "ret.csv").write_text("filename,caption\n0.png,a red circle\n")
    assert open_eval_set(str(tmp_path / "ret.csv")).task == "zeroshot_retrieval"


def test_bad_compositional_files_are_one_line(tmp_path):
    (tmp_path / "swap_att.json").write_text(json.dumps({"1": {"filename": "x.png", "caption": "a"}}))
    with pytest.raises(EvalError, match="needs filename, caption and negative_caption"):
        open_eval_set(str(tmp_path / "swap_att.json") + "?task=image_caption_selection")
    (tmp_path / "b.csv").write_text("filename,caption,negative_caption\nx.png,a,\n")
    with pytest.raises(EvalError, match="line 2 has no negative caption"):
        open_eval_set(str(tmp_path / "b.csv"))


def test_demo_generator_writes_sugarcrepe_subsets(tmp_path, micro_model_json):
    from data_tools.make_demo_data import write_compositional
    from vlp.eval import evaluate
    from vlp.models import create_model

    write_compositional(tmp_path / "comp", 12, 32, seed=0)
    subsets = sorted(p.stem for p in (tmp_path / "comp").glob("*.json"))
    assert subsets == ["replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"]
    rows = json.loads((tmp_path / "comp" / "swap_att.json").read_text())
    for row in rows.values():
        pos, neg = row["caption"].split(), row["negative_caption"].split()
        assert sorted(pos) == sorted(neg) and pos != neg          # a swap reuses exactly the same words
    rel = json.loads((tmp_path / "comp" / "replace_rel.json").read_text())
    assert all(r["caption"] != r["negative_caption"] for r in rel.values())
    b = create_model(micro_model_json)
    (res,) = evaluate(b.model, b.tokenizer, b.preprocess_val, [str(tmp_path / "comp")])
    assert res["task"] == "image_caption_selection" and res["vlp"]["n_images"] == 12
    assert {f"acc/{s}" for s in subsets} <= set(res["metrics"]) and 0 <= res["metrics"]["acc"] <= 1
