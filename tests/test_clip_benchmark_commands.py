"""`vlp eval --clip-benchmark-commands` prints a command for every way of naming sets (`--data`, `--dataset wds/..
--dataset_root`, a suite file: the first two printed an empty line), and the commands run as printed on one-shard
sets (CLIP_benchmark's default 4 workers failed there) into files of their own; vlp's result JSON carries
CLIP_benchmark's fields (`"pretrained": ""` beside `local-dir:EXPORT`) under a file name without a colon."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import eval_zeroshot

CB_FIELDS = ("dataset", "model", "pretrained", "task", "language")


@pytest.fixture(scope="module")
def export(tmp_path_factory, micro_model_json) -> Path:
    import open_clip
    import torch

    from vlp.models import create_model, export_open_clip

    torch.manual_seed(0)
    b = create_model(micro_model_json)
    out = tmp_path_factory.mktemp("run") / "first" / "export"
    return Path(export_open_clip(b.model, b.model_cfg, open_clip.get_model_preprocess_cfg(b.model), out))


def _ways(demo_data, tmp_path) -> dict[str, list[str]]:
    colors, _, retrieval, _ = demo_data["eval_data"]
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"- {{dataset: wds/demo_colors, root: {colors}}}\n- {{dataset: wds/demo_retrieval, root: {retrieval}}}\n")
    base = Path(colors).parent
    return {"--data": ["--data", colors, retrieval],
            "--dataset": ["--dataset", "wds/demo_colors", "wds/demo_retrieval", "--dataset_root", f"{base}/{{dataset}}"],
            "suite": ["--data", str(suite)]}


def _printed(argv, capsys) -> list[str]:
    assert eval_zeroshot.main([*argv, "--clip-benchmark-commands"]) == 0
    return capsys.readouterr().out.strip().splitlines()


def _opt(cmd: str, flag: str) -> str:
    args = shlex.split(cmd)
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("way", ["--data", "--dataset", "suite"])
def test_commands_printed_for_every_way_of_naming_sets(way, export, demo_data, tmp_path, capsys):
    cmds = _printed(["--checkpoint", str(export), *_ways(demo_data, tmp_path)[way]], capsys)
    assert len(cmds) == 2 and all(c.startswith("clip_benchmark eval --dataset wds/demo_") for c in cmds), cmds
    for cmd in cmds:
        root = Path(_opt(cmd, "--dataset_root"))
        assert int(_opt(cmd, "--num_workers")) == int((root / "test" / "nshards.txt").read_text()) == 1, cmd
        assert _opt(cmd, "--model") == f"local-dir:{export}" and _opt(cmd, "--pretrained") == "", cmd
    outputs = [_opt(c, "--output") for c in cmds]
    assert len(set(outputs)) == 2 and not any(":" in o or "/" in o for o in outputs), outputs


def test_a_set_clip_benchmark_cannot_read_is_named(export, demo_data, capsys):
    comp = demo_data["eval_data"][3]
    (line,) = _printed(["--checkpoint", str(export), "--data", comp], capsys)
    assert line.startswith(f"# {comp}: CLIP_benchmark reads only webdataset roots"), line


def test_result_fields_are_clip_benchmarks_and_file_names_have_no_colon(export, demo_data, tmp_path):
    out = tmp_path / "out"
    assert eval_zeroshot.main(["--checkpoint", str(export), "--data", demo_data["eval_data"][0], "--output", str(out),
                               "--quiet", "--no-geometry"]) == 0
    (path,) = out.glob("*.json")
    r = json.loads(path.read_text())
    assert ":" not in path.name, path.name
    assert (r["model"], r["pretrained"]) == (f"local-dir:{export}", ""), r   # as CLIP_benchmark writes them


def _run_as_printed(cmd: str, cwd: Path):
    """The printed command through the shell; CLIP_benchmark 1.6.2's zero-shot accuracy() calls float() on an
    array, which NumPy 2 refuses, so a classification command runs its own main() with a NumPy-2-safe accuracy
    (the same figures, benchmarks/eval.py) and the printed arguments, split as the shell splits them."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if "--task zeroshot_classification" in cmd:
        code = ("import sys, shlex; from benchmarks.eval import numpy2_safe_accuracy\n"
                "import clip_benchmark.metrics.zeroshot_classification as zc; zc.accuracy = numpy2_safe_accuracy\n"
                "from clip_benchmark.cli import main; sys.argv = shlex.split(sys.argv[1]); sys.exit(main())")
        argv = [sys.executable, "-c", code, cmd]
        env["PYTHONPATH"] = str(Path(eval_zeroshot.__file__).parent)
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_printed_commands_run_and_match_vlps_results(export, demo_data, tmp_path, capsys):
    """Both demo sets through CLIP_benchmark as printed (about 35 s each on 2 loaded cores, its imports mostly)."""
    sets = _ways(demo_data, tmp_path)["--data"]
    cmds = _printed(["--checkpoint", str(export), *sets, "--precision", "fp32"], capsys)
    cb_dir = tmp_path / "cb"
    cb_dir.mkdir()
    for cmd in cmds:
        done = _run_as_printed(cmd, cb_dir)
        assert done.returncode == 0, (cmd, done.stderr[-3000:])
    ours = tmp_path / "vlp"
    assert eval_zeroshot.main(["--checkpoint", str(export), *sets, "--output", str(ours), "--quiet", "--no-geometry",
                               "--precision", "fp32"]) == 0
    for cmd in cmds:
        name = _opt(cmd, "--output")
        theirs, mine = json.loads((cb_dir / name).read_text()), json.loads((ours / name).read_text())
        assert {k: mine[k] for k in CB_FIELDS} == {k: theirs[k] for k in CB_FIELDS}, (mine, theirs)
        for key, value in theirs["metrics"].items():
            assert mine["metrics"][key] == pytest.approx(value, abs=1e-6), key
