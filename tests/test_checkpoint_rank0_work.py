"""#29.8: what rank 0 does alone for a checkpoint (writing and hashing the consolidated model file when committing,
reading every file through to verify it on resume) is waited for through the long-timeout CPU group, never inside
a collective bounded by --dist-timeout: with rank 0's checkpoint work made slower than --dist-timeout, a 2-rank
run saves, finishes and resumes. (Before: the other ranks waited in all_gather_object / broadcast_object_list of
the default group and the run died of a gloo timeout.)"""
from __future__ import annotations

import os
import textwrap

import pytest

from tests.test_train_distributed import _free_port
from tests.conftest import repo_root

DIST_TIMEOUT_S, SLOW_S = 5, 10

# sitecustomize runs in every process before train.py: rank 0's checkpoint file work sleeps past --dist-timeout
SLOW_RANK0 = textwrap.dedent(f"""
    import os, time
    if os.environ.get("RANK") == "0":
        from vlp.runtime import atomic_file
        real_save, real_verify = atomic_file.atomic_torch_save, atomic_file.verify
        def slow_save(obj, path, *a, **k):
            if path.name.startswith("step_"):
                time.sleep({SLOW_S})
            return real_save(obj, path, *a, **k)
        def slow_verify(path):
            time.sleep({SLOW_S})
            return real_verify(path)
        atomic_file.atomic_torch_save, atomic_file.verify = slow_save, slow_verify
""")


@pytest.mark.slow
def test_rank0_checkpoint_work_outlasts_the_collective_timeout(demo_data, micro_model_json, tmp_path):
    import subprocess
    import sys

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_RANK0)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), str(repo_root())])}
    common = ["--train-data", demo_data["train_data"], "--model", micro_model_json, "--batch-size", "8",
              "--workers", "1", "--save-every", "2", "--report-to", "none", "--no-progress", "--name", "slow",
              "--dist-timeout", str(DIST_TIMEOUT_S), "--logs", str(tmp_path / "logs")]

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(repo_root() / "train.py"), "--", *common, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    first = torchrun("--max-steps", "3", "--no-async-save")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Timed out" not in first.stderr
    second = torchrun("--max-steps", "4", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr and "Timed out" not in second.stderr
