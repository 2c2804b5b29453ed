"""Faults as clusters deliver them (issue 22, items 1-4, 10, 13, 15, 16): a signal to the whole process group,
torchrun as the parent (SIGTERM, SIGUSR1, SLURM's delivery to every process), a SIGKILLed rank, a data error
mid-run, two trainings started at once on one run folder, names that leave --logs, a malformed --config."""
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
from tests.test_faults_run import _flags, _start, _stop, _wait_for_step
from tests.test_train_loop import _losses
from vlp.config import ConfigError, parse_config
from vlp.runtime import checkpoint as ckpt
from vlp.train.run_state import read_status


# ---- 1: the whole process group, DataLoader workers included -------------------------------------------------

def test_sigterm_to_the_process_group_with_two_workers_saves_and_exits_75(demo_data, micro_model_json, tmp_path):
    """`kill -TERM -- -PGID` (SLURM, torchrun): torch's worker set-up let SIGTERM kill the two DataLoader workers,
    and the run died with `DataLoader worker ... is killed by signal` (exit 1, no checkpoint). Now the workers
    ignore it, the step in flight finishes and is saved, exit 75, and status.json says preempted."""
    proc = _start(_flags(demo_data, micro_model_json, tmp_path, "grp", "--workers", "2"), start_new_session=True)
    stopped = _stop(proc, tmp_path / "grp", 2, signal.SIGTERM, group=True)
    status = read_status(tmp_path / "grp")
    assert status["state"] == "preempted" and status["exit_code"] == 75 and status["checkpoint_step"] == stopped


def test_a_repeated_stop_signal_within_the_window_is_one_request():
    """SLURM signals every process of the step and torchrun relays the same signal: the second copy, a few
    milliseconds later, used to kill the rank mid-save. A repeat after the window still stops at once."""
    code = ("import os, signal, time\n"
            "from vlp.runtime import preemption as p\n"
            "p.REPEAT_WINDOW_S = 1.0\n"
            "with p.StopSignals() as s:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
            "    print('alive', s.received == signal.SIGTERM, flush=True)\n"
            "    time.sleep(1.2); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "    print('not stopped', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(repo_root())})
    assert proc.stdout == "alive True\n" and proc.returncode == -signal.SIGTERM, (proc.stdout, proc.stderr)


def test_eval_workers_outlive_a_process_group_sigterm():
    """An in-loop eval's DataLoader workers got the group's SIGTERM too and died, so the set was logged as an
    error; they now ignore it as training's workers do: every image is decoded and the main process holds the
    stop request for after the eval."""
    code = ("import io, time, torch\n"
            "from PIL import Image\n"
            "from vlp.eval.decode import iter_batches\n"
            "from vlp.eval.evalset import Sample\n"
            "from vlp.runtime.preemption import StopSignals\n"
            "buf = io.BytesIO(); Image.new('RGB', (8, 8), 'red').save(buf, 'PNG')\n"
            "samples = [Sample(key=str(i), target=0, data=buf.getvalue()) for i in range(64)]\n"
            "def slow(im):\n"
            "    time.sleep(0.05); return torch.zeros(3, 8, 8)\n"
            "seen = []\n"
            "with StopSignals() as s:\n"
            "    for idx, images in iter_batches(samples, slow, batch_size=4, num_workers=2):\n"
            "        seen += idx.tolist()\n"
            "        if len(seen) == 4: print('first', flush=True)\n"
            "    print(sorted(seen) == list(range(64)), s.received == 15, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo_root())}, start_new_session=True)
    assert proc.stdout.readline() == "first\n", proc.communicate(timeout=60)[1]
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert out == "True True\n" and proc.returncode == 0, (out, err[-2000:])


# ---- 10: a data error mid-run saves the last good state -----------------------------------------------------

def test_data_error_mid_run_saves_the_last_good_state(micro_model_json, tmp_path):
    """A shard cut short (45 of its 50 samples unreadable, 15% of the epoch > --max-bad-fraction 0.05) stops the
    run after some steps; the steps trained are saved before the one-line error (they were lost: exit 2, no
    checkpoint), and the saved state resumes."""
    from tests.test_data_fixtures import write_shards
    from tests.test_faults_data import _truncate_after
    from vlp.data.errors import DataError
    from vlp.train.loop import train

    paths = write_shards(tmp_path / "sh", 300, 50)
    _truncate_after(paths[3], 155)                  # samples 155..199 lost
    flags = ["--train-data", str(tmp_path / "sh" / "{00000..00005}.tar"), "--model", micro_model_json,
             "--logs", str(tmp_path), "--name", "cut", "--batch-size", "8", "--workers", "0", "--report-to", "none",
             "--no-progress", "--log-every", "1", "--save-every", "1000", "--max-steps", "200", "--warmup", "0"]
    with pytest.raises(DataError) as e:
        train(parse_config(flags))
    trained = max(_losses(tmp_path / "cut"))
    saved = tmp_path / "cut" / "checkpoints" / f"step_{trained:08d}.pt"
    assert f"the state after step {trained} is saved in {saved}" in str(e.value) and "\n" not in str(e.value)
    assert trained > 1 and saved.is_file() and ckpt.load_state(saved)["step"] == trained
    status = read_status(tmp_path / "cut")
    assert status["state"] == "failed" and status["exit_code"] == 2 and status["checkpoint_step"] == trained
    assert "truncated" in status["message"]


# ---- 13: one run per run folder -----------------------------------------------------------------------------

def test_two_trainings_started_at_once_on_one_folder(demo_data, micro_model_json, tmp_path):
    """Both used to run: metrics.jsonl held every step twice, and one run's stale-temp sweep deleted the other's
    live checkpoint. Now one holds the folder; the other stops with one line before touching it."""
    # 40 steps: long enough that the first still holds the folder when the second, started with it, asks (at 6
    # steps an idle machine let one run finish before the other had imported torch)
    flags = _flags(demo_data, micro_model_json, tmp_path, "shared", "--workers", "0", "--max-steps", "40",
                   "--save-every", "10")
    procs = [_start(flags) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for rc, err in results if rc == 2)
    assert refused.count("\n") == 1 and re.match(r"error: run folder .* is in use by another training \(pid \d+ ",
                                                 refused), refused
    rows = [json.loads(ln)["step"] for ln in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 41))
    assert read_status(tmp_path / "shared")["state"] == "finished"


def test_stale_temp_sweep_keeps_a_live_writers_file(tmp_path):
    """The sweep before each save removes temporary files of writers that are gone, never a running one's."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        folder = tmp_path / "checkpoints"
        folder.mkdir()
        mine, theirs = folder / f".step_00000002.pt.tmp-{gone.pid}", folder / f".step_00000002.pt.tmp-{live.pid}"
        mine.write_bytes(b"x")
        theirs.write_bytes(b"x")
        ckpt.save_checkpoint(folder, 1, {"step": 1}, keep=2)
        assert theirs.exists() and not mine.exists()
    finally:
        live.kill()
        live.wait()


# ---- 15, 16: names that leave --logs, a malformed --config --------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../x", "/tmp/elsewhere", ".", "a/../../b"])
def test_names_leaving_logs_are_refused(name):
    with pytest.raises(ConfigError, match=r"^--name .* must name a folder inside --logs") as e:
        parse_config(["--train-data", "x.tar", "--logs", "logs", "--name", name])
    assert "\n" not in str(e.value)
    assert parse_config(["--train-data", "x.tar", "--name", "group/run-1"]).run.name == "group/run-1"


def test_malformed_yaml_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch-size: 4\n  lr: [1\n")
    proc = subprocess.run([sys.executable, str(repo_root() / "train.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == (f"error: config file {bad} is not valid YAML (line 2, column 5): "
                                                    "mapping values are not allowed here\n"), proc.stderr


# ---- 1-4 under torchrun (2 gloo ranks, 2 DataLoader workers each) ---------------------------------------------

SIGNALS_FLAG = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _torchrun(demo_data, model_json, tmp_path, name, *launcher):
    from tests.test_train_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           *launcher, str(repo_root() / "train.py"), "--",
           *_flags(demo_data, model_json, tmp_path, name, "--workers", "2", "--max-steps", "400", "--save-every", "3")]
    return subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ranks(proc) -> list:
    import psutil

    kids = psutil.Process(proc.pid).children()   # torchrun's own children: the ranks, not their workers
    return sorted((p for p in kids if "train.py" in " ".join(p.cmdline()) and "RANK" in p.environ()),
                  key=lambda p: p.environ()["RANK"])


@pytest.mark.slow
@pytest.mark.parametrize("delivery", ["SIGTERM to torchrun", "SIGUSR1 to torchrun", "SIGTERM to every process"])
def test_torchrun_preemption_is_saved_and_recorded(demo_data, micro_model_json, tmp_path, delivery):
    """torchrun exits 1 whatever its ranks return, so the run folder says how it ended. SIGUSR1 reaches the
    ranks only with the documented --signals-to-handle (torchrun itself died of it and the ranks trained on); SLURM's
    delivery to every process plus torchrun's relay gives each rank the signal twice (it used to kill them)."""
    import psutil

    sig = signal.SIGUSR1 if "USR1" in delivery else signal.SIGTERM
    for doc in ("README.md", "docs/training.md", "docs/reliability.md"):   # the torchrun lines users copy
        assert SIGNALS_FLAG in (repo_root() / doc).read_text(), doc
    proc = _torchrun(demo_data, micro_model_json, tmp_path, "pre", SIGNALS_FLAG)
    _wait_for_step(tmp_path / "pre", proc, 3)
    targets = [psutil.Process(proc.pid)]
    if delivery == "SIGTERM to every process":
        targets += psutil.Process(proc.pid).children(recursive=True)   # ranks and their DataLoader workers
    for p in targets:
        p.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("preempted: ")]
    assert len(lines) == 1 and not re.search(r"^\[rank\d\]:.*Traceback", err, re.M), err[-3000:]
    status = read_status(tmp_path / "pre")
    assert status["state"] == "preempted", status
    stopped = max(_losses(tmp_path / "pre"))
    assert status["checkpoint_step"] == stopped and stopped < 400
    assert ckpt.load_state(Path(status["checkpoint"]))["step"] == stopped


@pytest.mark.slow
def test_a_sigkilled_rank_is_named_in_one_line(demo_data, micro_model_json, tmp_path):
    """SIGKILL one of 2 ranks: the survivor used to wait ~5 s (the dead rank's DataLoader workers held its gloo
    sockets open) and die with a gloo `Connection reset by peer` traceback. Now it prints one line naming the
    lost rank at once, exits 2, and the checkpoints stay loadable; status.json says failed."""
    import psutil

    proc = _torchrun(demo_data, micro_model_json, tmp_path, "kill")
    _wait_for_step(tmp_path / "kill", proc, 4)
    rank0, rank1 = _ranks(proc)
    killed_at = time.monotonic()
    rank1.kill()
    psutil.wait_procs([rank0], timeout=60)
    survivor_s = time.monotonic() - killed_at
    out, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: rank 1 (pid {rank1.pid}) ended during training"), err[-3000:]
    assert not re.search(r"^\[rank\d\]:.*Traceback", err, re.M), err[-3000:]
    assert survivor_s < 30, survivor_s
    status = read_status(tmp_path / "kill")
    assert status["state"] == "failed" and "rank 1" in status["message"] and status["reason"] == "rank lost"
    for _, path in ckpt.list_checkpoints(tmp_path / "kill" / "checkpoints"):
        assert ckpt.load_state(path)["step"] > 0
