"""Suites: a YAML list of sets -> one aggregate table (CSV, markdown, JSON) whose mean is the weighted mean of
the per-set figures written beside it; the CLIP_benchmark mapping; one-line errors."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from vlp.eval import EvalError
from vlp.eval.cb_commands import clip_benchmark_commands
from vlp.eval.suite import aggregate, load_suite, table_files


def _suite(tmp_path, demo_data, extra=""):
    colors, shapes, retrieval, comp = demo_data["eval_data"][:4]
    path = tmp_path / "suite.yaml"
    path.write_text(f"""datasets:
  - dataset: wds/demo_colors
    root: {colors}
    task: zeroshot_classification
  - path: {retrieval}
    weight: 2
  - path: {comp}
    metric: acc/swap_att
{extra}""")
    return path


def test_suite_table_is_the_weighted_mean_of_the_written_results(tmp_path, demo_data, micro_model_json):
    from tests.conftest import repo_root

    out = tmp_path / "out"
    suite = _suite(tmp_path, demo_data)
    r = subprocess.run([sys.executable, str(repo_root() / "eval_zeroshot.py"), "--model", micro_model_json,
                        "--data", str(suite), "--output", str(out), "--quiet", "--no-geometry"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    per_set = {}
    for f in out.glob("*.json"):
        if f.name != "suite.json":
            d = json.loads(f.read_text())
            per_set[d["dataset"]] = d["metrics"]
    assert set(per_set) == {"wds/demo_colors", "wds/demo_retrieval", "demo_compositional"}
    expected = {"wds/demo_colors": per_set["wds/demo_colors"]["acc1"],
                "wds/demo_retrieval": (per_set["wds/demo_retrieval"]["image_retrieval_recall@1"]
                                       + per_set["wds/demo_retrieval"]["text_retrieval_recall@1"]) / 2,
                "demo_compositional": per_set["demo_compositional"]["acc/swap_att"]}
    weights = {"wds/demo_colors": 1, "wds/demo_retrieval": 2, "demo_compositional": 1}
    mean = sum(expected[k] * weights[k] for k in expected) / 4
    agg = json.loads((out / "suite.json").read_text())
    (row,) = agg["rows"]
    assert row["scores"] == pytest.approx(expected) and row["mean"] == pytest.approx(mean)
    with open(out / "suite.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and float(rows[0]["mean"]) == pytest.approx(mean, rel=1e-5)
    md = (out / "suite.md").read_text()
    assert md.startswith("| checkpoint | wds/demo_colors | wds/demo_retrieval | demo_compositional | mean |")
    assert f"{mean:.4f}" in md and f"{mean:.4f}" in r.stdout


def _result(ckpt_step, dataset, task, metrics):
    return {"dataset": dataset, "task": task, "metrics": metrics, "model": "m", "pretrained": "p",
            "language": "en", "vlp": {"step": ckpt_step}}


def test_aggregate_one_row_per_checkpoint(tmp_path, demo_data):
    entries = load_suite(str(_suite(tmp_path, demo_data)))
    names = [("wds/demo_colors", "zeroshot_classification"), ("wds/demo_retrieval", "zeroshot_retrieval"),
             ("demo_compositional", "image_caption_selection")]
    results = []
    for step, base in ((100, 0.2), (200, 0.6)):
        results += [_result(step, *names[0], {"acc1": base}),
                    _result(step, *names[1], {"image_retrieval_recall@1": base, "text_retrieval_recall@1": base + 0.1}),
                    _result(step, *names[2], {"acc": 0.5, "acc/swap_att": base + 0.2})]
    agg = aggregate(results, entries, names)
    assert [r["checkpoint"] for r in agg["rows"]] == ["step 100", "step 200"]
    assert agg["rows"][0]["mean"] == pytest.approx((0.2 + 2 * 0.25 + 0.4) / 4)
    assert agg["rows"][1]["mean"] == pytest.approx((0.6 + 2 * 0.65 + 0.8) / 4)
    files = table_files(agg)
    assert files["suite.csv"].splitlines()[2].startswith("step 200,0.6,0.65,0.8,")


def test_clip_benchmark_mapping(tmp_path, demo_data):
    entries = load_suite(str(_suite(tmp_path, demo_data, extra=f"""  - dataset: wds/demo_shapes
    root: {demo_data['eval_data'][1]}
    task: linear_probe
    fewshot_k: 5
""")))
    cmds = clip_benchmark_commands(entries, "ViT-B-32", "laion2b_s34b_b79k", amp=False)
    name = "laion2b_s34b_b79k_ViT-B-32_en"
    assert cmds == [
        f"clip_benchmark eval --dataset wds/demo_colors --dataset_root {demo_data['eval_data'][0]} --model ViT-B-32 "
        f"--pretrained laion2b_s34b_b79k --task zeroshot_classification --no_amp --num_workers 1 "
        f"--output wds_demo_colors_{name}_zeroshot_classification.json",
        # a `path:` entry that is a wds root is CLIP_benchmark's too; a SugarCrepe set is not
        f"clip_benchmark eval --dataset wds/demo_retrieval --dataset_root {demo_data['eval_data'][2]} --model ViT-B-32 "
        f"--pretrained laion2b_s34b_b79k --task zeroshot_retrieval --recall_k 1 5 10 --no_amp --num_workers 1 "
        f"--output wds_demo_retrieval_{name}_zeroshot_retrieval.json",
        f"# {demo_data['eval_data'][3]}: CLIP_benchmark reads only webdataset roots (wds/NAME); "
        "vlp eval scores this set",
        f"clip_benchmark eval --dataset wds/demo_shapes --dataset_root {demo_data['eval_data'][1]} --model ViT-B-32 "
        f"--pretrained laion2b_s34b_b79k --task linear_probe --fewshot_k 5 --val_proportion 0.2 --no_amp "
        f"--num_workers 1 --output wds_demo_shapes_{name}_linear_probe.json"]
    # no task given: the one vlp scores the set with (CLIP_benchmark would take classification for this name)
    retrieval = load_suite(str(_suite(tmp_path, demo_data, extra=f"""  - dataset: wds/demo_retrieval
    root: {demo_data['eval_data'][2]}
""")))[-1]
    assert "--task zeroshot_retrieval --recall_k 1 5 10 " in clip_benchmark_commands([retrieval])[0]
    # a relative root is read against the suite's folder; one that is not there is one line, not a command
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.yaml").write_text("- {dataset: wds/x, root: nowhere/x}\n")
    with pytest.raises(EvalError, match="root .*nowhere/x does not exist .*suite file's folder"):
        clip_benchmark_commands(load_suite(str(tmp_path / "sub" / "s.yaml")))
    # a vlp export (or the run folder holding it) is CLIP_benchmark's local-dir: model, whatever --model says
    (export := tmp_path / "run" / "export").mkdir(parents=True)
    (export / "open_clip_config.json").write_text("{}")
    for given in (export, export.parent):
        assert f"--model local-dir:{export} --pretrained '' --task zeroshot_classification " in \
            clip_benchmark_commands(entries[:1], "vlp-tiny", str(given))[0]
    # relative paths as given on the command line: the commands name absolute roots, runnable from anywhere
    import os

    rel = load_suite(os.path.relpath(_suite(tmp_path, demo_data)))[:1]
    assert f"--dataset_root {demo_data['eval_data'][0]} " in clip_benchmark_commands(rel)[0]


@pytest.mark.parametrize("text,message", [
    ("- path: x\n  weigth: 2\n", "unknown key"),
    ("- path: x\n  weight: -1\n", "weight must be"),
    ("- dataset: wds/x\n", "either `path` or `dataset` \\+ `root`"),
    ("- path: x\n  task: captioning\n", "task must be one of"),
    ("datasets: [\n", "not valid YAML"),
    ("{}\n", "a suite is a list"),
])
def test_bad_suites_are_one_line(tmp_path, text, message):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(EvalError, match=message):
        load_suite(str(p))


def test_relative_paths_resolve_against_the_suite(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "s.yml"
    p.write_text("- path: ../sets/colors?split=val\n  classnames: names.txt\n")
    (e,) = load_suite(str(p))
    assert e.spec.startswith(str(tmp_path / "sub" / ".." / "sets" / "colors") + "?")
    assert "split=val" in e.spec and "classnames=" + str(tmp_path / "sub" / "names.txt").replace("/", "%2F") in e.spec
    assert not math.isnan(e.weight)
