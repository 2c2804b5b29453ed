"""An unusable OMP_NUM_THREADS ('abc', '0') gets one line, no libgomp warnings, vlp's automatic thread count,
and a banner that credits the automatic rule, not the variable (it credited the variable torch had ignored)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import repo_root
from vlp.thread_env import drop_invalid_omp
from vlp.train.threads import pick_threads, usable_cores


@pytest.mark.parametrize("value, kept", [("abc", False), ("0", False), ("", False), ("-2", False), ("2.5", False),
                                         ("4", True), (" 3 ", True), ("4,2", True)])
def test_which_values_are_dropped(value, kept):
    env = {"OMP_NUM_THREADS": value}
    notice = drop_invalid_omp(env)
    assert ("OMP_NUM_THREADS" in env) == kept and (notice is None) == kept
    if not kept:
        assert notice.count("\n") == 0 and repr(value) in notice and "automatic" in notice


@pytest.mark.parametrize("value, entry", [("abc", ["train.py"]), ("0", ["-m", "vlp", "train"])])
def test_training_with_an_unusable_value(value, entry, demo_data, micro_model_json, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": value}
    cmd = [sys.executable, *entry, "--train-data", demo_data["train_data"], "--model", micro_model_json,
           "--logs", str(tmp_path), "--name", "omp", "--batch-size", "16", "--workers", "0", "--max-steps", "1",
           "--report-to", "none", "--no-progress"]
    done = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "libgomp" not in done.stderr, done.stderr
    notices = [ln for ln in done.stderr.splitlines() if "OMP_NUM_THREADS" in ln]
    assert len(notices) == 1 and "ignored" in notices[0], notices
    threads = re.search(r"(\d+) torch threads \(([^)]*)\)", done.stderr)
    assert threads and "cores" in threads.group(2), done.stderr
    assert int(threads.group(1)) == pick_threads(usable_cores(), 0)
