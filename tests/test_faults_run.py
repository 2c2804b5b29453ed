"""Faults injected into training runs (issue 11, items 1, 3, 7): real signals to a real train.py process,
non-finite options, gradients and weights, and resuming or reusing a run that has nothing to resume."""
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
from tests.test_train_loop import _losses
from vlp.config import ConfigError, parse_config
from vlp.runtime.preemption import EXIT_PREEMPTED

STEPS = 14


def _flags(demo_data, model_json, logs, name, *extra):
    return ["--train-data", demo_data["train_data"], "--model", model_json, "--logs", str(logs), "--name", name,
            "--batch-size", "16", "--workers", "1", "--lr", "2e-3", "--warmup", "2", "--report-to", "none",
            "--no-progress", "--seed", "5", "--log-every", "1", "--save-every", "100", "--max-steps", str(STEPS),
            *extra]


def _start(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(repo_root() / "train.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_step(run_dir: Path, proc, step: int) -> None:
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or max(_losses(run_dir), default=0) < step:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)


def _stop(proc, run_dir: Path, after: int, sig, group: bool) -> int:
    """Signal `proc` once it has logged step `after`; check exit code 75 and the one line; the stopped step."""
    _wait_for_step(run_dir, proc, after)
    (os.killpg if group else os.kill)(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    line = err.strip().splitlines()[-1]  # after the run's banner and progress lines: one line, no traceback
    assert line.startswith(f"preempted: {sig.name}: stopped after step ") and "Traceback" not in err, err
    stopped = int(line.split("stopped after step ")[1].split(",")[0])
    saved = run_dir / "checkpoints" / f"step_{stopped:08d}.pt"
    assert str(saved) in line and saved.is_file()
    assert max(_losses(run_dir)) == stopped  # the step in flight was finished and logged, then nothing more
    return stopped


def test_signals_save_exit_75_and_resume_continues_exactly(demo_data, micro_model_json, tmp_path):
    """One run stopped three times (SIGUSR1 as SLURM's warning; SIGINT to the whole process group, as Ctrl-C
    sends it, so the data loader's worker gets it too; SIGTERM), each time resumed with --resume latest: its
    loss curve equals the uninterrupted run's, step for step."""
    steps = 40  # each stop lands 1-5 steps after the step it waited for (2-3 on an idle 2-core machine, more on
    #             a faster one: CI's ended the third stop at step 14, the old length, so nothing was left to resume)
    ref = _start(_flags(demo_data, micro_model_json, tmp_path, "ref", "--max-steps", str(steps)))
    flags = _flags(demo_data, micro_model_json, tmp_path, "pre", "--max-steps", str(steps))
    run_dir = tmp_path / "pre"
    stopped = 0
    for i, (sig, group) in enumerate([(signal.SIGUSR1, False), (signal.SIGINT, True), (signal.SIGTERM, False)]):
        proc = _start([*flags, *(["--resume", "latest"] if i else [])], start_new_session=True)
        stopped = _stop(proc, run_dir, stopped + 2, sig, group)
    assert stopped < steps
    last = _start([*flags, "--resume", "latest"])
    for proc in (ref, last):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    reference, losses = _losses(tmp_path / "ref"), _losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-6), step


@pytest.mark.parametrize("flag,value", [
    ("--lr", "nan"), ("--grad-clip-norm", "nan"), ("--grad-clip-norm", "0"), ("--uniformity-weight", "nan"),
    ("--alignment-weight", "inf"), ("--wd", "-1"), ("--save-every", "0"), ("--log-every", "0"), ("--seed", "-1"),
    ("--rrc-scale", ["nan", "1"]), ("--eps", "0"), ("--max-steps", "0"),
])
def test_meaningless_numbers_are_refused(flag, value):
    with pytest.raises(ConfigError) as e:
        parse_config(["--train-data", "x.tar", flag, *([value] if isinstance(value, str) else value)])
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_nonfinite_gradients_stop_with_the_last_finite_state(demo_data, micro_model_json, tmp_path, monkeypatch):
    """A NaN gradient with a finite loss (what `--grad-clip-norm nan` produced) stops the run before the
    optimiser step; the checkpoint is the finite state before it, and nothing NaN is exported."""
    import torch

    from vlp.runtime import checkpoint as ckpt
    from vlp.train import loop
    from vlp.train import trainer as trainer_module

    calls = {"n": 0}
    real_step = trainer_module.train_step

    def poisoned_step(model, *args, **kwargs):
        calls["n"] += 1
        losses = real_step(model, *args, **kwargs)
        if calls["n"] == 3:
            next(p for p in model.parameters() if p.grad is not None).grad[0].fill_(float("nan"))
        return losses

    monkeypatch.setattr(trainer_module, "train_step", poisoned_step)
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "nangrad", "--workers", "0"))
    with pytest.raises(loop.TrainingError, match=r"^gradient norm is nan at step 3; the state before this step is "
                                                 r"saved in .*step_00000002\.pt$"):
        loop.train(cfg)
    state = ckpt.load_state(ckpt.resolve_resume("latest", tmp_path / "nangrad" / "checkpoints"))
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nangrad" / "export").exists()


def test_nan_weights_are_never_saved(demo_data, micro_model_json, tmp_path, monkeypatch):
    """Weights turned NaN after the step-2 checkpoint: the NaN loss that follows finds the state before its
    step NaN as well, saves nothing, and names the last finite checkpoint."""
    import torch

    from vlp.runtime import checkpoint as ckpt
    from vlp.train import loop
    from vlp.train import trainer as trainer_module

    calls = {"n": 0}
    real_step = trainer_module.train_step

    def poisoned_step(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                getattr(model, "module", model).visual.proj.view(-1)[0] = float("nan")
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", poisoned_step)
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "nanw", "--workers", "0", "--save-every", "2"))
    with pytest.raises(loop.TrainingError, match=r"^loss is nan at step 4; the state before this step is not "
                                                 r"finite either\. The last finite checkpoint is .*step_00000002\.pt"):
        loop.train(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "nanw" / "checkpoints")] == [2]


def test_resume_latest_with_nothing_to_resume_says_so(demo_data, micro_model_json, tmp_path, capsys):
    from vlp.train.loop import train

    train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "fresh", "--workers", "0", "--max-steps", "1",
                              "--resume", "latest")))
    err = capsys.readouterr().err
    assert "--resume latest: no checkpoint" in err and "starting from step 0" in err


def test_reusing_a_name_without_checkpoints_keeps_its_config(demo_data, micro_model_json, tmp_path):
    run = tmp_path / "used"
    run.mkdir()
    (run / "config.yaml").write_text("kept: true\n")
    proc = subprocess.run([sys.executable, str(repo_root() / "train.py"),
                           *_flags(demo_data, micro_model_json, tmp_path, "used")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "new --name" in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert (run / "config.yaml").read_text() == "kept: true\n"


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_under_torchrun(demo_data, micro_model_json, tmp_path):
    """torchrun, 2 CPU processes (gloo): SIGTERM to rank 1 only. Both ranks agree at the end of the same
    step, one checkpoint is written, both exit 75, and the resumed run matches an uninterrupted one."""
    import psutil

    from tests.test_train_distributed import _free_port

    def torchrun(name, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(repo_root() / "train.py"), "--",
               *_flags(demo_data, micro_model_json, tmp_path, name, "--workers", "0"), *extra]
        return subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    ref = torchrun("ref")
    victim = torchrun("pre")
    _wait_for_step(tmp_path / "pre", victim, 2)
    rank1 = [p for p in psutil.Process(victim.pid).children(recursive=True)
             if p.environ().get("RANK") == "1" and "train.py" in " ".join(p.cmdline())]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode != 0
    # Rank 0 speaks for both; it learnt of the signal from rank 1 in the step's all-reduce.
    lines = [ln for ln in err.splitlines() if ln.startswith("preempted: a stop signal on another rank: stopped after "
                                                            "step ")]
    assert len(lines) == 1, err[-3000:]
    assert [int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", err, re.M)] == [EXIT_PREEMPTED] * 2, err[-3000:]
    stopped = int(lines[0].split("stopped after step ")[1].split(",")[0])
    assert [p.name for p in (tmp_path / "pre" / "checkpoints").glob("step_*.pt")] == [f"step_{stopped:08d}.pt"]

    resumed = torchrun("pre", "--resume", "latest")
    for proc in (ref, resumed):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    reference, losses = _losses(tmp_path / "ref"), _losses(tmp_path / "pre")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-6), step


def test_phantom_samples_on_one_rank_end_the_epoch_on_both(micro_model_json, tmp_path):
    """torchrun, 2 CPU processes (gloo), a size file claiming 10x what its shard holds and --max-bad-fraction 1:
    the rank whose range holds the phantoms runs out of data first; both ranks leave the epoch after the same
    step (agreed in the end-of-step collective), nothing is repeated to fill the claim, and the run ends after
    its --epochs, exit 0, with a checkpoint that resumes (the old code trained 4x the real data: 26 steps)."""
    from tests.test_data_fixtures import write_shards
    from tests.test_train_distributed import _free_port

    write_shards(tmp_path / "sh", 128, 32)
    sizes = json.loads((tmp_path / "sh" / "sizes.json").read_text())
    sizes["00002.tar"] = 320                                   # holds 32
    (tmp_path / "sh" / "sizes.json").write_text(json.dumps(sizes))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(repo_root() / "train.py"), "--",
           "--train-data", str(tmp_path / "sh" / "{00000..00003}.tar"), "--model", micro_model_json,
           "--logs", str(tmp_path), "--name", "lying", "--batch-size", "8", "--workers", "1", "--epochs", "1",
           "--max-bad-fraction", "1", "--report-to", "none", "--no-progress", "--log-every", "1", "--warmup", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = sorted(_losses(tmp_path / "lying"))
    assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) <= 8   # 128 real samples / 16 per step
    assert re.search(r"warning: epoch 0 ended after \d+ of 26 steps", proc.stderr), proc.stderr[-3000:]
    assert "the size file says 320 samples, the shard holds 32" in proc.stderr
    assert (tmp_path / "lying" / "checkpoints" / f"step_{steps[-1]:08d}.pt").is_file()
