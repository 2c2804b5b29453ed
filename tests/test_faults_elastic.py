"""Faults of elastic runs under a real torchrun (issue 29, items 5-7): the agent SIGKILLed under its ranks, a rank
SIGSTOPped so that a collective times out, a rank SIGKILLed under `--max-restarts`. Two gloo ranks on CPU."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import repo_root
from tests.test_faults_cluster import _ranks
from tests.test_faults_run import _flags, _wait_for_step
from tests.test_train_loop import _losses
from vlp.train import checkpoint as ckpt
from vlp.train.run_state import read_status

TRACEBACK = re.compile(r"Traceback|frame #\d|Exception raised from", re.M)


def _torchrun(demo_data, model_json, tmp_path, name, *flags, launcher=(), steps=400, save_every=3):
    """`setsid torchrun --nproc_per_node 2 train.py ...` (its own session, as a batch script starts it)."""
    from tests.test_train_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           *launcher, str(repo_root() / "train.py"), "--",
           *_flags(demo_data, model_json, tmp_path, name, "--workers", "1", "--max-steps", str(steps),
                   "--save-every", str(save_every), *flags)]
    return subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_killed_launcher_stops_its_ranks_with_their_state_saved(demo_data, micro_model_json, tmp_path):
    """SIGKILL torchrun's agent alone: its ranks, orphaned, used to train on to the last step and die in a c10d
    `Broken pipe` with 46 C++ frame lines. Now every rank notices within a second, they finish the step, save it
    together and exit 75 with one line; the checkpoint of that step resumes."""
    import psutil

    proc = _torchrun(demo_data, micro_model_json, tmp_path, "agent")
    _wait_for_step(tmp_path / "agent", proc, 4)
    ranks = _ranks(proc)
    assert len(ranks) == 2
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)   # the agent only: its ranks live in sessions of their own
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    exit_s = time.monotonic() - killed
    for p in alive:   # orphans must not outlive a failed test
        p.kill()
    assert not alive, f"ranks still training {exit_s:.0f} s after the launcher died"
    out, err = proc.communicate(timeout=60)   # the ranks held the agent's stderr: it ends when they do
    lines = [ln for ln in err.splitlines() if ln.startswith("launcher gone: ")]
    assert len(lines) == 1 and not TRACEBACK.search(err), err[-3000:]
    stopped = int(re.fullmatch(r"launcher gone: state saved at step (\d+); continue with --resume latest",
                               lines[0]).group(1))
    status = read_status(tmp_path / "agent")
    assert status["state"] == "preempted" and status["exit_code"] == 75 and status["checkpoint_step"] == stopped
    assert max(_losses(tmp_path / "agent")) == stopped < 400   # no orphan trained on
    print(f"\nlauncher killed: ranks gone after {exit_s:.1f} s, stopped at step {stopped}")
    more = _torchrun(demo_data, micro_model_json, tmp_path, "agent", "--resume", "latest", steps=stopped + 2)
    out, err = more.communicate(timeout=300)
    assert more.returncode == 0, err[-3000:]
    assert f"resumed from {tmp_path / 'agent' / 'checkpoints' / ckpt.checkpoint_name(stopped)} at step {stopped}" \
        in out + err
    assert read_status(tmp_path / "agent")["state"] == "finished" and max(_losses(tmp_path / "agent")) == stopped + 2
