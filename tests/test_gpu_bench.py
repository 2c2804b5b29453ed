"""benchmarks/gpu.py --tiny runs on the CPU with a tiny model (CI), so the one-call GPU benchmark cannot rot where
no GPU is lent: every trainer in its own process, the table and the JSON printed whatever happens (a batch that does
not fit is a row that says so; the time budget stops the run). Its figures on a CPU say nothing about a GPU."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from benchmarks import gpu
from tests.conftest import repo_root


def _run(tmp_path, *flags, timeout=300):
    out = tmp_path / "g.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(repo_root() / "benchmarks" / "gpu.py"), "--tiny", "--json", str(out),
                           "--out", str(tmp_path / "runs"), *flags], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "setting" in proc.stdout and "trainer" in proc.stdout   # the table
    return json.loads(out.read_text()), proc.stdout, time.perf_counter() - t0


@pytest.mark.slow   # two ceiling and two training processes: about a minute on 2 loaded cores
def test_gpu_benchmark_tiny_runs_on_cpu(tmp_path):
    res, table, wall = _run(tmp_path)
    rows = res["rows"]
    assert [(r["setting"], r["trainer"]) for r in rows] == [(s, t) for s in ("ceiling", "end to end")
                                                            for t in gpu.TRAINERS]
    for r in rows:
        assert "error" not in r and r["samples_per_s"] > 0 and r["batch"] == 8
    e2e = [r for r in rows if r["setting"] == "end to end"]
    assert all(0 <= r["data_wait_frac"] <= 1 and r["e2e_samples_per_s"] > 0 and r["steps"] >= 1 for r in e2e)
    assert res["e2e_ratio"]["vlp-tiny"] > 0
    print(f"gpu.py --tiny: {wall:.0f} s")


@pytest.mark.slow   # ~30 s on 2 loaded cores (processes importing torch)
def test_a_batch_that_does_not_fit_is_a_row(tmp_path):
    """A batch the allocator refuses (here the CPU's, 5 TB of images) leaves rows that say so, not a crash."""
    res, table, _ = _run(tmp_path, "--candidates", "100000000", "--no-e2e")
    rows = res["rows"]
    assert [r["trainer"] for r in rows] == list(gpu.TRAINERS)
    assert rows[0]["error"] == "out of memory at batch 100000000" and "error" in rows[1]
    assert "out of memory at batch 100000000" in table


@pytest.mark.slow
def test_the_budget_bounds_the_run(tmp_path):
    res, table, wall = _run(tmp_path, "--budget-s", "20")
    assert wall < 45 and res["wall_s"] < 30
    assert any("budget" in r.get("error", "") for r in res["rows"]) and len(res["rows"]) == 4
