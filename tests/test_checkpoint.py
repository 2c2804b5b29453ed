"""Checkpoints are atomic: a writer killed mid-save leaves the previous checkpoint as the newest loadable one."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from vlp.runtime import checkpoint as ckpt
from vlp.runtime import rng_state

WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from vlp.runtime import checkpoint as ckpt
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
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "rng": rng_state.capture()}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    state = ckpt.load_state(ckpt.resolve_resume("latest", tmp_path))  # weights_only=True load
    expected = (torch.rand(3), random.random(), np.random.rand())
    rng_state.restore(state["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


class _VisibleGPUs:
    """torch.cuda's RNG calls as a process sees them with `count` visible GPUs, training on device `current`
    (a GPU-less stand-in: CUDA's RNG cannot run here); `set_rng_state_all` indexes devices as torch's does."""

    def __init__(self, monkeypatch, count: int, current: int = 0):
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.count, self.current = count, current
        for name in ("is_available", "is_initialized"):
            monkeypatch.setattr(torch.cuda, name, lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)])
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i] for i in range(self.count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set(s, i) for i, s in enumerate(states)])

    def _index(self, device) -> int:
        index = self.current if device == "cuda" else int(device)
        if index >= self.count:
            raise IndexError(f"device index {index} out of range: {self.count} visible")
        return index

    def set(self, state, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()


def test_gpu_rng_is_the_ranks_own_device_and_resumes_where_fewer_gpus_are_visible(monkeypatch, tmp_path):
    """#23.8: saved under torchrun with 8 visible GPUs (rank 3 on device 3), resumed under SLURM with 1."""
    saving = _VisibleGPUs(monkeypatch, count=8, current=3)
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1, "rng": rng_state.capture()}, keep=1)
    state = ckpt.load_state(ckpt.resolve_resume("latest", tmp_path))
    assert torch.equal(state["rng"]["cuda"], saving.states[3])  # the rank's own device only
    resuming = _VisibleGPUs(monkeypatch, count=1, current=0)
    rng_state.restore(state["rng"])
    assert torch.equal(resuming.states[0], saving.states[3])
    older = {**state["rng"], "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}  # every GPU's
    rng_state.restore(older)  # no IndexError: the entry of the device this process trains on
    assert torch.equal(resuming.states[0], older["cuda"][0])


def test_shares_written_beside_the_main_file_commit_with_it_and_a_missing_one_is_passed_over(tmp_path):
    """#22.5: other ranks' optimiser shares are files the main file lists; they go with it (keep-last-k) and a
    checkpoint missing one does not verify (--resume latest takes the one before, saying so)."""
    def save(step: int) -> None:
        name = ckpt.part_name(step, f"t{step}", 1)
        ckpt.save_part(tmp_path, name, {"step": step, "optimizer_state": {1: {"exp_avg": torch.full((999,), step)}}})
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "parts": [name], "optimizer": {
            "state": {0: {"exp_avg": torch.full((9,), step)}}, "param_groups": []}}, keep=2)

    for step in (1, 2, 3):
        save(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step_00000002.pt", "step_00000002.pt.part1-t2", "step_00000003.pt", "step_00000003.pt.part1-t3"]
    state = ckpt.load_state(tmp_path / "step_00000003.pt")
    assert sorted(state["optimizer"]["state"]) == [0, 1]
    assert torch.equal(state["optimizer"]["state"][1]["exp_avg"], torch.full((999,), 3))
    (tmp_path / "step_00000003.pt.part1-t3").unlink()
    notes = []
    assert ckpt.resolve_resume("latest", tmp_path, say=notes.append).name == "step_00000002.pt"
    assert notes == ["--resume latest: step_00000003.pt is incomplete: step_00000003.pt.part1-t3, written beside it "
                     "by another rank, is missing; resuming from step_00000002.pt, the newest checkpoint that verifies"]
    assert ckpt.load_state(tmp_path / "step_00000003.pt", parts=False)["step"] == 3  # its weights still load


def test_two_ranks_save_their_shares_one_verifies_and_both_restore_exactly(tmp_path):
    """#22.5, #23.9 with 2 gloo processes (the benchmark's own code, vlp-tiny), each writer in the same run: the
    earlier writer's rank 1 writes its optimiser share beside rank 0's file, DCP's each rank its own file; on resume
    rank 0 alone reads the files through to verify them (/proc rchar); every parameter and optimiser state comes
    back bit for bit."""
    from benchmarks.checkpoint_io import measure

    ranks = measure("vlp-tiny", 2, fsdp=False, root=str(tmp_path), writers=("v1", "dcp"))
    v1, dcp = ranks[0]["v1"], ranks[0]["dcp"]
    files, total = v1["files"], v1["bytes"]
    assert sorted(files)[0] == "step_00000001.pt" and len(files) == 2 and ".part1-" in sorted(files)[1], files
    assert all(r["v1"]["exact"] and r["dcp"]["exact"] for r in ranks)
    assert total <= v1["read_bytes"] < 1.5 * total  # verified once (was: verified, then read again)
    assert ranks[1]["v1"]["read_bytes"] < 0.05 * total  # mapped, not read (was: the whole checkpoint, twice)
    names = set(dcp["files"])
    assert {"step_00000002.pt", "step_00000002.dcp/.metadata", "step_00000002.dcp/manifest.json",
            "step_00000002.dcp/__0_0.distcp", "step_00000002.dcp/__1_0.distcp"} == names, names
    assert dcp["bytes"] <= dcp["read_bytes"]   # rank 0 verified every file


def test_the_finite_check_before_a_save_is_exact():
    """The weights check on the save's critical path sums first (fast); a sum that overflows is not a NaN."""
    from vlp.train.health import all_finite

    big = torch.full((4,), 3e38)  # finite elements, their float32 sum is inf
    assert all_finite([torch.ones(3), big, torch.zeros(0), torch.arange(3)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not all_finite([torch.ones(3), torch.tensor([1.0, bad, 2.0])])
        assert not all_finite([torch.tensor([1.0, bad], dtype=torch.bfloat16)])
    assert not all_finite([torch.tensor([float("inf"), float("-inf")])])  # inf - inf: nan, still caught
