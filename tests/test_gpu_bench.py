"""benchmarks/gpu.py runs on the CPU with a tiny model, so the one-command GPU benchmark cannot rot where no GPU is
lent: the compute-only ceiling in the default suite, the end-to-end half (two trainer processes) among the slow tests.
Its figures on a CPU say nothing about a GPU; the test checks the rows it produces."""
from __future__ import annotations

import json

import pytest

from benchmarks import gpu


def _check(rows, settings):
    assert [(r["setting"], r["trainer"]) for r in rows] == [(s, t) for s in settings for t in gpu.TRAINERS]
    for r in rows:
        assert r["samples_per_s"] > 0 and r["batch"] == 8


def test_gpu_benchmark_ceiling_runs_on_cpu(tmp_path):
    out = gpu.main(["--model", "vlp-tiny", "--batch-size", "8", "--no-e2e", "--json", str(tmp_path / "g.json")])
    _check(out["rows"], ["ceiling"])
    assert json.loads((tmp_path / "g.json").read_text())["rows"] == out["rows"]


@pytest.mark.slow
def test_gpu_benchmark_end_to_end_runs_on_cpu(tmp_path):
    out = gpu.main(["--model", "vlp-tiny", "--batch-size", "8", "--e2e-steps", "4", "--log-every", "2",
                    "--out", str(tmp_path)])
    _check(out["rows"], ["ceiling", "end to end"])
    e2e = [r for r in out["rows"] if r["setting"] == "end to end"]
    assert all(0 <= r["data_wait_frac"] <= 1 and r["e2e_samples_per_s"] > 0 for r in e2e)
    assert out["e2e_ratio"]["vlp-tiny"] > 0
