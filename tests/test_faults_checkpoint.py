"""Faults injected into checkpoints (issue 11, items 4, 5, 6): a full disk during a save, flipped bits,
empty files, another architecture's or another tool's checkpoint, and an unwritable run folder."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import MICRO_CFG, repo_root
from vlp.config import ConfigError, parse_config
from vlp.runtime import checkpoint as ckpt


def _flags(demo_data, model_json, logs, name, *extra):
    return ["--train-data", demo_data["train_data"], "--model", model_json, "--logs", str(logs), "--name", name,
            "--batch-size", "16", "--workers", "0", "--report-to", "none", "--no-progress", "--max-steps", "2",
            "--save-every", "1", *extra]


@pytest.fixture(scope="module")
def run(demo_data, micro_model_json, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    from vlp.train.loop import train

    logs = tmp_path_factory.mktemp("run")
    train(parse_config(_flags(demo_data, micro_model_json, logs, "r")))
    return logs / "r"


def _limited(limit: int):
    """preexec_fn: a real per-file size limit (EFBIG from the kernel) instead of a full disk, which needs root."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


DISK_FULL = textwrap.dedent("""
    import json, signal, resource, sys, torch
    from pathlib import Path
    from vlp.runtime import checkpoint as ckpt
    d = Path(sys.argv[1])
    ckpt.save_checkpoint(d, 1, {"step": 1, "w": torch.ones(1000)}, keep=3)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        ckpt.save_checkpoint(d, 2, {"step": 2, "w": torch.zeros(1_000_000)}, keep=3)
    except ckpt.CheckpointWriteError as e:
        print(json.dumps(str(e)))
""")


def test_full_disk_during_save_removes_the_partial_file_and_keeps_earlier_checkpoints(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    message = json.loads(proc.stdout)
    assert "\n" not in message and f"in {tmp_path}:" in message and "4,065,536 bytes needed" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001.pt"]  # no temporary file left
    state = ckpt.load_state(ckpt.resolve_resume("latest", tmp_path))
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))


def test_full_disk_stops_train_py_with_one_line(demo_data, micro_model_json, tmp_path):
    proc = subprocess.run([sys.executable, str(repo_root() / "train.py"),
                           *_flags(demo_data, micro_model_json, tmp_path, "full")],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limited(4_000_000))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # after the run's banner: one line, no traceback
    # step 1's periodic save failed in the background (one warning, training went on); the final one stops the run
    assert line.startswith("error: checkpoint of step 2 not saved: rank 0: cannot write __0_0.distcp in "), line
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: checkpoint of step 1 not saved")]
    assert len(warned) == 1 and warned[0].endswith("(written in the background); the previous checkpoint is kept")
    assert "Traceback" not in proc.stderr
    assert "File too large" in line and "bytes needed" in line and str(tmp_path / "full" / "checkpoints") in line
    assert os.listdir(tmp_path / "full" / "checkpoints") == []


def _flip(src, dst, offset_fraction=0.5):
    data = bytearray(src.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at:at + 4096] = bytes(b ^ 0xFF for b in data[at:at + 4096])  # a 4 KiB bit flip inside a tensor
    dst.write_bytes(bytes(data))
    return dst


def test_checksum_is_written_and_open_clip_still_loads_the_file(run):
    import zipfile

    path = run / "checkpoints" / "step_00000002.pt"
    assert ckpt.verify(path) is True
    assert zipfile.ZipFile(path).comment.startswith(b"vlp-sha256:")
    assert "model" in torch.load(path, map_location="cpu", weights_only=True)  # as open_clip would read it


def test_flipped_bits_are_refused_by_resume_pretrained_and_eval(run, demo_data, micro_model_json, tmp_path):
    from vlp.models import create_model, load_checkpoint
    from vlp.train.loop import train

    bad = _flip(run / "checkpoints" / "step_00000002.pt", tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"is corrupt: its SHA-256 does not match"):
        train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "x", "--resume", str(bad))))
    with pytest.raises(ConfigError, match=r"is corrupt"):
        create_model(micro_model_json, pretrained=str(bad))
    with pytest.raises(ConfigError, match=r"is corrupt"):
        load_checkpoint(str(bad))
    proc = subprocess.run([sys.executable, str(repo_root() / "eval_zeroshot.py"), "--checkpoint", str(bad),
                           "--data", demo_data["eval_data"][0], "--output", str(tmp_path / "ev")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "is corrupt" in proc.stderr, proc.stderr


def test_empty_checkpoint_is_one_line_everywhere(demo_data, micro_model_json, tmp_path):
    from vlp.models import create_model, load_checkpoint
    from vlp.train.loop import train

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for attempt in (lambda: train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "e",
                                                      "--resume", str(empty)))),
                    lambda: create_model(micro_model_json, pretrained=str(empty)),
                    lambda: load_checkpoint(str(empty))):
        with pytest.raises(ConfigError, match=r"is empty \(0 bytes\)") as e:
            attempt()
        assert "\n" not in str(e.value)


def test_resuming_another_architecture_or_an_open_clip_file(run, demo_data, micro_model_json, tmp_path):
    from vlp.train.loop import train

    wider = tmp_path / "vlp-micro-wide.json"
    wider.write_text(json.dumps({**MICRO_CFG, "embed_dim": 48}))
    with pytest.raises(ConfigError, match=r"(does not fit this architecture|was trained with another model config) "
                                          r".*resume with the run's own --model"):
        train(parse_config(_flags(demo_data, str(wider), tmp_path, "w", "--resume",
                                  str(run / "checkpoints" / "step_00000002.pt"))))
    state = torch.load(run / "checkpoints" / "step_00000002.pt", map_location="cpu", weights_only=True)
    foreign = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "x", "state_dict": state["model"]}, foreign)  # open_clip_train's layout
    with pytest.raises(ConfigError, match=r"not a vlp training checkpoint .*use --pretrained"):
        train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "o", "--resume", str(foreign))))


def test_logs_that_cannot_hold_a_run_folder(demo_data, micro_model_json, tmp_path):
    from vlp.train.loop import train

    a_file = tmp_path / "logs.txt"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the run folder .*logs.txt"):
        train(parse_config(_flags(demo_data, micro_model_json, a_file, "f")))
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match=r"cannot write the run folder .*Permission denied"):
            train(parse_config(_flags(demo_data, micro_model_json, ro, "r")))
    shutil.rmtree(tmp_path / "ro", ignore_errors=True)


def test_retrieval_captions_not_utf8_is_one_line(tmp_path, capsys):
    """(Item 6's last case; a sizes.json holding a non-integer is tests/test_faults_data.py's.)"""
    import eval_zeroshot
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (16, 16), (i * 90, 0, 0)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "captions.csv").write_bytes(b"image,caption\n0.jpg,red\n1.jpg,caf\xe9\n")
    rc = eval_zeroshot.main(["--checkpoint", str(tmp_path / "none.pt"), "--model", "vlp-tiny",
                             "--data", str(tmp_path / "captions.csv"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "captions.csv:3: captions are not UTF-8" in err, err


def _copy_run(run, tmp_path):
    shutil.copytree(run, tmp_path / "r")
    return tmp_path / "r"


def test_resume_latest_passes_over_a_truncated_newest_checkpoint(run, demo_data, micro_model_json, tmp_path,
                                                                 capsys):
    """#22.14: the newest checkpoint cut in half (a node lost mid-copy), an older one intact."""
    from vlp.train.loop import train

    folder = _copy_run(run, tmp_path) / "checkpoints"
    newest = folder / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    out = train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "r", "--resume", "latest",
                                    "--max-steps", "3")))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "--resume latest:" in ln]
    assert len(lines) == 1 and "step_00000002.pt is truncated or damaged" in lines[0], lines
    assert "resuming from step_00000001.pt, the newest checkpoint that verifies" in lines[0]
    assert out["run_dir"] == str(tmp_path / "r")
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [1, 2, 3]  # step 2 trained again, step 3 after it
    assert ckpt.check(newest) is True and ckpt.load_state(folder / "step_00000003.pt")["step"] == 3
    flipped = _flip(folder / "step_00000003.pt", folder / "step_00000003.pt")
    for _, path in ckpt.list_checkpoints(folder):
        path.write_bytes(b"")  # nothing verifies: one line naming each
    with pytest.raises(ConfigError, match=r"no checkpoint in .* verifies: step_00000003.pt is empty") as e:
        ckpt.resolve_resume("latest", folder)
    assert "\n" not in str(e.value) and flipped.name in str(e.value)


def test_a_text_file_given_as_a_checkpoint_is_one_line(demo_data, micro_model_json, tmp_path):
    """#22.16: was `cannot read checkpoint ...: pop from empty list`."""
    from vlp.models import create_model, load_checkpoint
    from vlp.train.loop import train

    notes = tmp_path / "notes.txt"
    notes.write_text("lr 1e-3 looked best\nstep 2000\n")
    for attempt in (lambda: train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "t",
                                                      "--resume", str(notes)))),
                    lambda: create_model(micro_model_json, pretrained=str(notes)),
                    lambda: load_checkpoint(str(notes))):
        with pytest.raises(ConfigError, match=r"notes.txt is not a checkpoint: a torch.save file starts with") as e:
            attempt()
        assert "\n" not in str(e.value)


def test_full_disk_while_exporting_is_one_line_and_resume_needs_no_space_to_resave(run, demo_data, micro_model_json,
                                                                                  tmp_path):
    """#22.16: the export fails on a full disk (was a 43-line SafetensorError and an empty export.tmp/ left); the
    run is resumed at its last step: it exports without writing the checkpoint it loaded again (which needed
    the checkpoint's size free once more). A per-file size limit smaller than the weights is the fault here."""
    root = _copy_run(run, tmp_path)
    weights = (root / "export" / "open_clip_model.safetensors").stat().st_size
    shutil.rmtree(root / "export")
    before = {p.name: p.stat().st_mtime_ns for p in (root / "checkpoints").iterdir()}
    proc = subprocess.run([sys.executable, str(repo_root() / "train.py"),
                           *_flags(demo_data, micro_model_json, tmp_path, "r", "--resume", "latest")],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limited(weights // 2))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write export in {root}: File too large (about "), line
    assert "the partial folder was removed" in line
    assert sorted(p.name for p in root.iterdir() if "export" in p.name) == []  # no export.tmp/ left
    assert {p.name: p.stat().st_mtime_ns for p in (root / "checkpoints").iterdir()} == before  # nothing rewritten
    proc = subprocess.run([sys.executable, str(repo_root() / "train.py"),
                           *_flags(demo_data, micro_model_json, tmp_path, "r", "--resume", "latest")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (root / "export" / "open_clip_model.safetensors").stat().st_size == weights
