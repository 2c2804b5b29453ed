"""`vlp train` without --model on a CPU says at the start that it trains the default ViT-B-32 there, then the
first step's measured time and what the run would take, naming --model vlp-tiny (it said nothing for 10 min)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import repo_root
from vlp.config import parse_config
from vlp.train import cpu_default
from vlp.train.loop import train


def _flags(demo_data, logs, *extra):
    return ["--train-data", demo_data["train_data"], "--logs", str(logs), "--name", "cpu", "--batch-size", "2",
            "--workers", "0", "--report-to", "none", "--no-progress", "--warmup", "1", *extra]


def _check_notes(err: str, model: str, steps: int):
    start = f"note: no --model given, so this trains {model} ("
    assert start in err and "on the CPU" in err and "--model vlp-tiny for a try-out" in err, err
    first = re.search(rf"first step of {model} on the CPU took (\d+\.\d+) s; the {steps} step\(s\) of this run", err)
    assert first and float(first.group(1)) > 0, err
    assert err.index(start) < err.index(first.group(0)), "the start note comes first"


def test_default_model_on_cpu_is_named_with_its_first_step_time(demo_data, micro_model_json, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(cpu_default, "DEFAULT_MODEL", "vlp-micro")   # the micro model stands in for ViT-B-32
    train(parse_config(_flags(demo_data, tmp_path, "--model", micro_model_json, "--max-steps", "2")))
    _check_notes(capsys.readouterr().err, "vlp-micro", 2)


def test_a_chosen_model_gets_no_note(demo_data, micro_model_json, tmp_path, capsys):
    train(parse_config(_flags(demo_data, tmp_path, "--model", micro_model_json, "--max-steps", "1")))
    assert "note: no --model given" not in capsys.readouterr().err


@pytest.mark.slow
def test_vlp_train_without_model_names_vit_b_32(demo_data, tmp_path):
    """The real default: one ViT-B-32 step at batch 2 (42 s on a loaded 2-core machine)."""
    done = subprocess.run([sys.executable, "-m", "vlp", "train", *_flags(demo_data, tmp_path, "--max-steps", "1")],
                          cwd=repo_root(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_notes(done.stderr, "ViT-B-32", 1)
