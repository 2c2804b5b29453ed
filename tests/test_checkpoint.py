"""Checkpoints are atomic: a writer killed mid-save leaves the previous checkpoint as the newest loadable one."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from vlp.train import checkpoint as ckpt

WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from vlp.train import checkpoint as ckpt
    d = Path(sys.argv[1])
    ckpt.save_checkpoint(d, 1, {"step": 1, "w": torch.ones(1000)}, keep=3)
    real_save = torch.save
    def slow_save(obj, fh):
        fh.write(b"PARTIAL" * 1000)
        fh.flush()
        (d / "writing").touch()
        time.sleep(60)
    torch.save = slow_save
    ckpt.save_checkpoint(d, 2, {"step": 2, "w": torch.zeros(1000)}, keep=3)
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "writing").exists():
            assert proc.poll() is None, "writer exited early"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert any(p.name.startswith(".step_00000002.pt.tmp") for p in tmp_path.iterdir())
    latest = ckpt.resolve_resume("latest", tmp_path)
    assert latest.name == "step_00000001.pt"
    state = ckpt.load_state(latest)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    # The next save cleans the leftover temporary file.
    ckpt.save_checkpoint(tmp_path, 3, {"step": 3}, keep=3)
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())


def test_keep_last_k_and_rng_round_trip(tmp_path):
    import random

    import numpy as np

    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "rng": ckpt.rng_state()}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    state = ckpt.load_state(ckpt.resolve_resume("latest", tmp_path))  # weights_only=True load
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
