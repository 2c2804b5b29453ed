"""`vlp eval` with CLIP_benchmark's and open_clip's habits: local-dir:EXPORT with --pretrained '', --output
file templates, CLIP_benchmark flags accepted or answered in one line (all at once, with the close flag for a
typo), and bad input that used to end in a traceback."""
from __future__ import annotations

import json

import pytest
import torch

import eval_zeroshot


@pytest.fixture(scope="module")
def export(tmp_path_factory, micro_model_json):
    import open_clip

    from vlp.models import create_model, export_open_clip

    torch.manual_seed(0)
    b = create_model(micro_model_json)
    return str(export_open_clip(b.model, b.model_cfg, open_clip.get_model_preprocess_cfg(b.model),
                                tmp_path_factory.mktemp("x") / "export"))


def _run(argv, capsys):
    rc = eval_zeroshot.main(argv + ["--quiet", "--no-geometry"])
    return rc, capsys.readouterr().err.strip()


def test_local_dir_model_and_output_template(export, demo_data, tmp_path, capsys):
    colors = demo_data["eval_data"][0]
    results = []
    for flags in (["--model", f"local-dir:{export}", "--pretrained", ""], ["--model", f"local-dir:{export}"],
                  ["--checkpoint", export]):
        out = tmp_path / str(len(results)) / "{dataset}_{task}.json"
        rc, err = _run(flags + ["--data", colors, "--output", str(out)], capsys)
        assert rc == 0, err
        (f,) = out.parent.iterdir()                  # CLIP_benchmark's template names the file itself
        assert f.name == "wds_demo_colors_zeroshot_classification.json"
        results.append(json.loads(f.read_text()))
    # CLIP_benchmark's fields for a local-dir model (pretrained ''); the folder itself is vlp.checkpoint
    assert all((r["model"], r["pretrained"], r["vlp"]["checkpoint"]) == (f"local-dir:{export}", "", export)
               for r in results), [(r["model"], r["pretrained"], r["vlp"]["checkpoint"]) for r in results]
    assert results[0]["metrics"] == results[1]["metrics"] == results[2]["metrics"]
    rc, err = _run(["--checkpoint", export, "--data", colors, "--output", str(tmp_path / "{nope}.json")], capsys)
    assert rc == 2 and err.startswith("error: --output template") and "\n" not in err


def test_clip_benchmark_flags_accepted_or_answered_in_one_line(export, demo_data, tmp_path, capsys):
    colors = demo_data["eval_data"][0]
    rc, err = _run(["--checkpoint", export, "--data", colors, "--language", "en", "--amp",
                    "--output", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    rc, err = _run(["--checkpoint", export, "--data", colors, "--save-clf", "clf.pt", "--batch-szie", "32",
                    "--langauge", "en", "--output", str(tmp_path / "b")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "--save-clf is CLIP_benchmark's" in err                  # every problem named at once
    assert "--batch-szie (did you mean --batch-size?)" in err and "--langauge (did you mean --language?)" in err
    rc, err = _run(["--checkpoint", export, "--data", colors, "--language", "fr"], capsys)
    assert rc == 2 and "only en" in err


def test_traceback_cases_are_one_line(export, demo_data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    rc, err = _run(["--checkpoint", export, "--data", demo_data["eval_data"][0],
                    "--output", str(tmp_path / "a_file" / "results")], capsys)
    assert rc == 2 and "is a file, not a folder" in err and len(err.splitlines()) == 1
    (tmp_path / "ints.jsonl").write_text(json.dumps({"image": "0.png", "caption": 7}) + "\n")
    rc, err = _run(["--checkpoint", export, "--data", str(tmp_path / "ints.jsonl")], capsys)
    assert rc == 2 and "entry 1: a caption must be text" in err and len(err.splitlines()) == 1


def test_class_lists_that_would_score_silently_wrong(tmp_path, demo_data, export, capsys):
    """A duplicated class name, and an empty class folder, are one line naming the real fault."""
    import shutil

    colors = tmp_path / "colors"
    shutil.copytree(demo_data["eval_data"][0], colors)
    names = (colors / "classnames.txt").read_text().split()
    (colors / "classnames.txt").write_text("\n".join([names[0]] + names[:-1]) + "\n")
    rc, err = _run(["--checkpoint", export, "--data", str(colors)], capsys)
    assert rc == 2 and f"class name '{names[0]}' appears twice" in err and len(err.splitlines()) == 1
    from vlp.data import demo_world as W

    for c in ("red", "blue", "green"):
        (tmp_path / "f" / c).mkdir(parents=True)
    rng = __import__("random").Random(0)
    for c in ("red", "blue"):
        W.render([W.Thing(c, "circle", "large", "center")], 32, rng).save(tmp_path / "f" / c / "0.png")
    (tmp_path / "f" / "classnames.txt").write_text("red\nblue\n")
    rc, err = _run(["--checkpoint", export, "--data", str(tmp_path / "f") + "?templates=simple"], capsys)
    assert rc == 2 and "class folder(s) green" in err and "hold no images" in err


def test_probe_acc5_is_nan_below_five_classes():
    """As CLIP_benchmark reports it: no top-5 figure with 3 classes (it would be 1.0 by construction)."""
    import math

    from vlp.eval.probe import linear_probe

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.arange(60) % 3
    assert math.isnan(linear_probe(x, y, x[:30], y[:30], 3)[0]["lp_acc5"])
