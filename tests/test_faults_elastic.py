"""Faults of elastic runs under a real torchrun (issue 29, items 5-7): the agent SIGKILLed under its ranks, a rank
SIGSTOPped so that a collective times out, a rank SIGKILLed under `--max-restarts`. Two gloo ranks on CPU."""
from __future__ import annotations

import importlib.util
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
from vlp.runtime import checkpoint as ckpt
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


def _status_when(run_dir: Path, proc, state: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (read_status(run_dir) or {}).get("state") != state:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return read_status(run_dir)


@pytest.mark.slow
def test_a_stalled_rank_times_out_in_one_line_and_the_restarted_group_resumes(demo_data, micro_model_json, tmp_path):
    """SIGSTOP one of 2 ranks under `--dist-timeout 30 --max-restarts 1`: rank 0 used to print a 25-line gloo
    traceback, and the steps since the last save were lost with no way back but a manual --resume. Now it ends with
    one line naming the collective, the timeout and the last saved step, status.json says `failed` / `collective
    timeout` (exit 2), and torchrun's restarted group resumes from that checkpoint and finishes the run."""
    import psutil

    run = tmp_path / "stall"
    proc = _torchrun(demo_data, micro_model_json, tmp_path, "stall", "--dist-timeout", "30", "--resume", "latest",
                     launcher=("--max-restarts", "1"), steps=16, save_every=3)
    _wait_for_step(run, proc, 4)
    while not (run / "checkpoints" / ckpt.checkpoint_name(3)).is_file():   # step 3's background save committed
        assert proc.poll() is None
        time.sleep(0.05)
    rank0, rank1 = _ranks(proc)
    rank1.suspend()   # SIGSTOP
    stopped = time.monotonic()
    status = _status_when(run, proc, "failed")
    noticed_s = time.monotonic() - stopped
    assert status["reason"] == "collective timeout" and status["exit_code"] == 2, status
    saved = status["checkpoint_step"]
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert re.fullmatch(rf"error: (collective \w+|DDP's [\w ()]+) \(vlp\.[\w.]+\) timed out after 30 s "
                        rf"\(--dist-timeout\): another rank stopped answering; the last checkpoint is "
                        rf"\S+step_0*{saved}\.pt \(step {saved}\): start the run again with --resume latest",
                        lines[0]), lines[0]
    first_attempt = err.split(lines[0])[0] + lines[0]
    assert not TRACEBACK.search(first_attempt), first_attempt[-3000:]
    assert f"at step {saved}" in out + err   # "resumed from ... at step N" by the restarted group
    assert read_status(run)["state"] == "finished" and max(_losses(run)) == 16
    assert not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE
    print(f"\nstalled rank: rank 0 failed {noticed_s:.1f} s after the SIGSTOP (timeout 30 s), resumed at step {saved}")


_STALL = """
import os, sys, time, datetime
import torch, torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=2))
if rank == 1:
    time.sleep(8)   # stalled: never joins the all-reduce
    sys.exit(0)
from vlp.train.collective_faults import timed_out
from vlp.train.health import any_rank
try:
    any_rank(True, torch.device("cpu"))
except RuntimeError as e:
    print(timed_out(e, 2.0))
    print(timed_out(RuntimeError("CUDA out of memory"), 2.0))
"""


@pytest.mark.slow
def test_a_collective_timeout_is_worded_with_the_collective_and_its_caller(tmp_path):
    """A real gloo timeout (rank 1 never joins rank 0's all-reduce): named by the torch.distributed call and the
    vlp function that made it; any other RuntimeError is not a timeout."""
    env = dict(os.environ, PYTHONPATH=str(repo_root()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _STALL, str(r), str(tmp_path / "store")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out, err = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=120)
    assert out.splitlines() == ["collective all_reduce (vlp.distributed.reduce_mean) timed out after 2 s "
                                "(--dist-timeout): another rank stopped answering", "None"], err[-2000:]


@pytest.mark.slow
def test_torchrun_restarts_resume_a_sigkilled_rank_from_the_newest_checkpoint(demo_data, micro_model_json, tmp_path):
    """`torchrun --max-restarts 3 ... --resume latest`, a rank SIGKILLed at step ~8 with saves every 5 steps: the
    survivor names the lost rank in one line and exits, torchrun restarts the group, the restarted ranks resume
    from the newest checkpoint, and the run finishes at its last step having repeated at most one save interval.
    The first start, with nothing to resume, starts at step 0."""
    run = tmp_path / "restart"
    proc = _torchrun(demo_data, micro_model_json, tmp_path, "restart", "--resume", "latest",
                     launcher=("--max-restarts", "3"), steps=24, save_every=5)
    _wait_for_step(run, proc, 8)
    _, rank1 = _ranks(proc)
    rank1.kill()
    killed = time.monotonic()
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert "--resume latest: no checkpoint in" in err and "starting from step 0" in err
    lost = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lost) == 1 and lost[0].startswith(f"error: rank 1 (pid {rank1.pid}) ended during training"), err[-3000:]
    resumed = [int(m) for m in re.findall(r"^resumed from \S+ at step (\d+)$", err, re.M)]
    assert len(resumed) == 1 and resumed[0] % 5 == 0 and resumed[0] >= 5, err[-3000:]
    rows = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in json.loads(ln)]
    repeated = len(rows) - len(set(rows))
    assert sorted(set(rows)) == list(range(1, 25)) and repeated <= 5, rows
    assert read_status(run)["state"] == "finished"
    assert ckpt.load_state(run / "checkpoints" / ckpt.checkpoint_name(24))["step"] == 24
    print(f"\nrank killed: group restarted and resumed at step {resumed[0]}, {repeated} steps repeated, "
          f"run finished {time.monotonic() - killed:.0f} s after the kill")


@pytest.mark.slow
def test_resume_with_more_loader_workers_finishes_the_epoch_exactly(demo_data, micro_model_json, tmp_path):
    """Stopped with --workers 2, resumed with --workers 3 (refused before: `saved with workers=2, now 3`): the
    rest of the epoch is re-planned over 3 workers and trained once, so the epoch ends exactly at its last
    step (600 samples, 16 a batch: 37 steps) with the re-planned pool used up (which samples: test_data_elastic)."""
    from tests.test_faults_run import _start, _stop

    flags = _flags(demo_data, micro_model_json, tmp_path, "workers", "--workers", "2", "--max-steps", "37",
                   "--save-every", "100")
    stopped = _stop(_start(flags, start_new_session=True), tmp_path / "workers", 6, signal.SIGTERM, group=False)
    proc = _start([*flags, "--workers", "3", "--resume", "latest"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    loader = ckpt.loader_states(tmp_path / "workers" / "checkpoints" / ckpt.checkpoint_name(37))[0]
    left = 600 // 16 * 16 - stopped * 16
    assert loader["workers"] == 3 and loader["epoch"] == 0
    assert sum(b - a for a, b in loader["pool"]) == left
    assert loader["batches_done"] == loader["epoch_batches"] == left // 16
    assert sorted(_losses(tmp_path / "workers")) == list(range(1, 38))


_WATCHED = """
import sys, time
from pathlib import Path
from vlp.runtime.preemption import StopSignals
from vlp.train.launcher import LauncherWatch
with StopSignals() as signals:
    watch = LauncherWatch(signals)
    print("watching", flush=True)
    deadline = time.monotonic() + 30
    while not signals.requested and time.monotonic() < deadline:
        time.sleep(0.05)
    print(watch.noticed_at, flush=True)   # CLOCK_MONOTONIC: one clock for every process of the machine
    print(watch.stopped(Path(sys.argv[1])), flush=True)
"""


def test_a_rank_notices_its_launcher_die_within_a_poll(tmp_path):
    """A stand-in agent (a process started by torchrun's rules: TORCHELASTIC_RUN_ID set for its child) SIGKILLed:
    its child asks to stop within one poll and words the stop as the launcher's; without the variable no watch."""
    env = dict(os.environ, PYTHONPATH=str(repo_root()), TORCHELASTIC_RUN_ID="t")
    agent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                              sys.executable, "-c", _WATCHED, str(tmp_path)],
                             env=env, stdout=subprocess.PIPE, text=True)
    assert agent.stdout.readline() == "watching\n"
    killed = time.monotonic()
    agent.kill()
    agent.wait()
    noticed, line = agent.stdout.readline(), agent.stdout.readline()   # the orphan still holds the pipe
    assert 0 < float(noticed) - killed < 1.5, float(noticed) - killed
    print(f"\nlauncher watch: the stop asked {float(noticed) - killed:.2f} s after the kill")
    assert line == "state saved at step 0; continue with --resume latest\n"
    from vlp.runtime.preemption import StopSignals
    from vlp.train.launcher import LauncherWatch

    assert LauncherWatch(StopSignals(), env={}).stopped(tmp_path) is None   # not under torchrun: nothing watched


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vlp.runtime.dcp_checkpoint") is None,
                    reason="resuming on another number of ranks needs the DCP checkpoints (issue 29.1-3)")
def test_four_ranks_resumed_on_two_train_the_rest_of_the_epoch_once(demo_data, micro_model_json, tmp_path):
    """4 ranks train 4 of their epoch's 9 steps (600 samples, 16 a batch per rank) and save; 2 ranks resume: the
    epoch's 5 x 64 untrained samples are re-planned into exactly 10 steps of 2 x 16, so step 14 ends the epoch and
    step 15 is the next one's first (which samples: tests/test_data_elastic.py counts them)."""
    from tests.test_train_distributed import _free_port

    def run(n, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(_free_port()), str(repo_root() / "train.py"), "--",
               *_flags(demo_data, micro_model_json, tmp_path, "shrink", "--workers", "1", "--save-every", "100",
                       *extra)]
        proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(4, "--max-steps", "4")
    run(2, "--max-steps", "15", "--resume", "latest")
    rows = [json.loads(ln) for ln in (tmp_path / "shrink" / "metrics.jsonl").read_text().splitlines()]
    epoch = {r["step"]: r["train/epoch"] for r in rows if "train/epoch" in r}
    assert sorted(epoch) == list(range(1, 16))
    assert [epoch[s] for s in (4, 5, 14, 15)] == [0, 0, 0, 1]   # the re-planned rest: exactly steps 5-14


_ATTEMPT_RANK = """
import datetime
import torch, torch.distributed as dist
from vlp.distributed import init_restarted_group
timeout = datetime.timedelta(seconds=8)
init_restarted_group(timeout)   # what the run does before accelerate opens the group with env://
if not dist.is_initialized():
    dist.init_process_group("gloo", init_method="env://", timeout=timeout)
x = torch.ones(1)
dist.all_reduce(x)
print(int(x.item()), flush=True)
"""


@pytest.mark.slow
def test_a_restarted_attempt_does_not_read_the_dead_groups_addresses():
    """torchrun's static rendezvous keeps one store for every attempt: a store served by this test stands in for
    the agent's. Attempt 0's two ranks leave their gloo addresses there and exit; in attempt 1 rank 1 starts 6 s
    before rank 0 (a slow start under load). Without a key prefix per attempt rank 1 read rank 0's dead address
    and both failed (`Gloo connectFullMesh failed ... Connection refused`, checked by hand); now both connect."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent_store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)

    def rank(r, attempt):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                   TORCHELASTIC_RESTART_COUNT=str(attempt), PYTHONPATH=str(repo_root()), OMP_NUM_THREADS="1")
        return subprocess.Popen([sys.executable, "-c", _ATTEMPT_RANK], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = [rank(0, 0), rank(1, 0)]
    assert [p.communicate(timeout=120)[0] for p in first] == ["2\n", "2\n"]
    late = rank(1, 1)
    time.sleep(6)
    restarted = [rank(0, 1), late]
    results = [p.communicate(timeout=120) for p in restarted]
    assert [out for out, _ in results] == ["2\n", "2\n"], [err[-500:] for _, err in results]
    del agent_store
