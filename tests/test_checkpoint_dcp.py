"""The guarantees of a DCP step checkpoint (`vlp.runtime.dcp_checkpoint`): committed atomically by its main file,
every file checksummed, `--resume latest` falling back past a damaged one, leftovers of killed writers swept, a
failed write (in the background too) reported in one line with the previous checkpoint kept."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlp.config import ConfigError
from vlp.runtime import checkpoint as ckpt
from vlp.runtime import atomic_file
from vlp.runtime import dcp_files as F
from vlp.runtime.atomic_file import CheckpointWriteError
from vlp.runtime.dcp_checkpoint import DcpSaver

ROOT = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(300, 50, generator=g), "b": torch.randn(7, generator=g)},
            "optim": {"w": {"exp_avg": torch.randn(300, 50, generator=g)}},
            "train": F.as_bytes_tensor({"step": step}), "loader/rank0": F.as_bytes_tensor({"pos": step})}


def _save(d: Path, step: int, **kw) -> Path:
    saver = DcpSaver(d, keep=3, group=None, **kw)
    return saver.save(step, _state(step), {"step": step})


def test_a_saved_step_verifies_and_holds_every_entry(tmp_path):
    path = _save(tmp_path, 1)
    assert path == tmp_path / "step_00000001.pt" and ckpt.check(path)
    main = ckpt.load_state(path, parts=False)
    assert main["dcp"] == "step_00000001.dcp" and torch.equal(main["state_dict"]["w"], _state(1)["model"]["w"])
    back = F.read_entries(tmp_path / main["dcp"], lambda k: True)
    assert torch.equal(back["optim.w.exp_avg"], _state(1)["optim"]["w"]["exp_avg"])
    assert F.from_bytes_tensor(back["loader/rank0"]) == {"pos": 1}


def _files_of(path: Path) -> list[Path]:
    folder = path.with_name(ckpt.load_state(path, parts=False)["dcp"])
    return [path, *sorted(p for p in folder.iterdir())]


def test_a_flipped_byte_in_any_file_is_a_one_line_refusal_and_latest_falls_back(tmp_path):
    """Every file of the checkpoint (main file, each DCP file, .metadata, manifest) is checked."""
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    names = [p.name for p in _files_of(second)]
    assert {".metadata", "manifest.json", "step_00000002.pt"} <= set(names)
    assert any(n.endswith(".distcp") for n in names)
    for victim in _files_of(second):
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        original = victim.read_bytes()
        victim.write_bytes(bytes(data))
        atomic_file._VERIFIED.clear()
        with pytest.raises(ConfigError) as refused:
            ckpt.check(second)
        line = str(refused.value)
        assert "\n" not in line and ("corrupt" in line or "damaged" in line), (victim.name, line)
        notes = []
        assert ckpt.resolve_resume("latest", tmp_path, say=notes.append).name == "step_00000001.pt"
        assert len(notes) == 1 and "step_00000001.pt, the newest checkpoint that verifies" in notes[0]
        victim.write_bytes(original)
    atomic_file._VERIFIED.clear()
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000002.pt"


KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.test_checkpoint_dcp import _save
    from vlp.runtime import atomic_file, dcp_files, dcp_checkpoint
    d, moment = Path(sys.argv[1]), sys.argv[2]
    _save(d, 1)
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    def after(fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            die()
        return wrapped
    if moment == "dcp-write":         # half-way through a rank's DCP file
        real = dcp_files._HashingStream.write
        def write(self, data):
            if self.size > 1000:
                die()
            return real(self, data)
        dcp_files._HashingStream.write = write
    elif moment == "manifest":        # all DCP files and the manifest written, nothing renamed
        dcp_checkpoint.F.write_manifest = after(dcp_files.write_manifest)
    elif moment == "renamed":         # the folder renamed to step_2.dcp, its main file not yet written
        dcp_checkpoint._fsync_dir = die
    elif moment == "main-file":       # half-way through the main file that would commit it
        real_h = atomic_file._Hashing.write
        def hwrite(self, data):
            if self.fh.fh.tell() > 1000:
                die()
            return real_h(self, data)
        atomic_file._Hashing.write = hwrite
    _save(d, 2)
""")


@pytest.mark.parametrize("moment", ["dcp-write", "manifest", "renamed", "main-file"])
def test_sigkill_at_any_moment_of_a_save_leaves_the_previous_checkpoint_resumable(tmp_path, moment):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path), moment, str(ROOT)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = {p.name for p in tmp_path.iterdir()}
    assert "step_00000002.pt" not in left and left - {"latest", "step_00000001.pt", "step_00000001.dcp"}, left
    latest = ckpt.resolve_resume("latest", tmp_path)
    assert latest.name == "step_00000001.pt" and ckpt.check(latest)
    # The next save sweeps what the killed writer left (its temporary folder, an uncommitted step_2.dcp).
    _save(tmp_path, 3)
    assert {p.name for p in tmp_path.iterdir()} == {"latest", "step_00000001.pt", "step_00000001.dcp",
                                                    "step_00000003.pt", "step_00000003.dcp"}


def test_a_failed_background_write_is_one_line_on_the_next_poll_and_keeps_the_previous(tmp_path, monkeypatch):
    said: list = []
    saver = DcpSaver(tmp_path, keep=3, group=None, say=said.append)
    saver.save(1, _state(1), {"step": 1})

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "__0_0.distcp")

    monkeypatch.setattr(F._HashingStream, "write", full_disk)
    assert saver.save(2, _state(2), {"step": 2}, background=True) is None   # staged; written in the background
    saver.pending[1].exception(timeout=60)   # (the write has failed by now)
    assert said == []   # reported at the next poll, by the loop
    saver.poll()
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("warning: checkpoint of step 2 not saved: rank 0: cannot write") and \
        "No space left on device" in said[0] and "the previous checkpoint is kept" in said[0]
    assert saver.failed == 2
    assert {p.name for p in tmp_path.iterdir()} == {"latest", "step_00000001.pt", "step_00000001.dcp"}
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000001.pt"
    monkeypatch.undo()
    assert saver.save(3, _state(3), {"step": 3}, background=True) is None
    saver.close()   # waits for it
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000003.pt"


def test_a_sync_write_that_fails_is_one_line_and_removes_its_folder(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    monkeypatch.setattr(F._HashingStream, "write",
                        lambda self, data: (_ for _ in ()).throw(OSError(errno.EFBIG, os.strerror(errno.EFBIG))))
    with pytest.raises(CheckpointWriteError) as failed:
        _save(tmp_path, 2)
    assert "\n" not in str(failed.value) and "File too large" in str(failed.value)
    assert {p.name for p in tmp_path.iterdir()} == {"latest", "step_00000001.pt", "step_00000001.dcp"}


def test_a_background_save_holds_the_state_of_its_step_and_at_most_one_is_in_flight(tmp_path, monkeypatch):
    """The state is copied to CPU memory before `save` returns (training may change the tensors at once);
    the next save waits for the one in flight before it starts."""
    import threading
    import time

    release, order = threading.Event(), []
    real = F._HashingStream.write

    def held_write(self, data):
        release.wait(60)   # every write waits until the test lets them go
        return real(self, data)

    saver = DcpSaver(tmp_path, keep=3, group=None)
    monkeypatch.setattr(F._HashingStream, "write", held_write)
    state = _state(1)
    saver.save(1, state, {"step": 1}, background=True)
    state["model"]["w"].zero_()   # the loop's next optimiser step
    waiter = threading.Thread(target=lambda: (saver.save(2, _state(2), {"step": 2}), order.append("2 saved")))
    waiter.start()
    time.sleep(0.5)
    assert order == [] and not (tmp_path / "step_00000001.pt").exists()   # save 2 waits for save 1
    order.append("1 released")
    release.set()
    waiter.join(60)
    assert order == ["1 released", "2 saved"]
    main = ckpt.load_state(tmp_path / "step_00000001.pt", parts=False)
    assert torch.equal(main["state_dict"]["w"], _state(1)["model"]["w"])   # the step's values, not the zeros
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000002.pt"
