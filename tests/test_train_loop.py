"""End-to-end training: the loss falls and held-out accuracy rises; kill-and-resume reproduces the run exactly;
the contrastive-gap terms close the modality gap."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import repo_root
from vlp.config import parse_config
from vlp.train.loop import train


def _flags(demo_data, model_json, logs, name, *extra):
    return ["--train-data", demo_data["train_data"], "--model", model_json, "--logs", str(logs), "--name", name,
            "--batch-size", "32", "--workers", "1", "--lr", "2e-3", "--wd", "0.05", "--warmup", "5",
            "--report-to", "none", "--no-progress", "--seed", "3", *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step; a resumed run's rows replace the killed run's rows for the same step."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def test_training_lowers_loss_and_beats_chance(demo_data, micro_model_json, tmp_path):
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "learn", "--max-steps", "120",
                              "--log-every", "10", "--eval-data", *demo_data["eval_data"][:1]))
    result = train(cfg)
    losses = _losses(Path(result["run_dir"]))
    assert losses[120] < 0.7 * losses[10], losses
    acc = result["eval/wds/demo_colors/acc1"]
    assert acc > 0.3, f"held-out colour accuracy {acc} (chance 0.125)"
    # The final model is exported in a form open_clip loads by itself.
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{result['run_dir']}/export")
    assert sum(p.numel() for p in model.parameters()) > 0


def _run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(repo_root() / "train.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_and_resume_matches_uninterrupted_run(demo_data, micro_model_json, tmp_path):
    common = ["--max-steps", "24", "--log-every", "1", "--save-every", "4", "--keep-checkpoints", "2"]
    ref = _run(_flags(demo_data, micro_model_json, tmp_path, "ref", *common))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    victim = _run(_flags(demo_data, micro_model_json, tmp_path, "killed", *common))
    ckpt = tmp_path / "killed" / "checkpoints" / "step_00000008.pt"
    deadline = time.time() + 300
    while not ckpt.exists():
        assert victim.poll() is None, victim.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(_losses(tmp_path / "killed"))
    assert killed_at < 24, "the run finished before it could be killed"

    resumed = _run(_flags(demo_data, micro_model_json, tmp_path, "killed", *common, "--resume", "latest"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    ref_losses, res_losses = _losses(tmp_path / "ref"), _losses(tmp_path / "killed")
    assert sorted(res_losses) == list(range(1, 25))
    for step in range(1, 25):
        assert res_losses[step] == pytest.approx(ref_losses[step], abs=1e-6), (step, killed_at)


def test_refuses_to_overwrite_a_run(demo_data, micro_model_json, tmp_path):
    flags = _flags(demo_data, micro_model_json, tmp_path, "once", "--max-steps", "2")
    train(parse_config(flags))
    proc = subprocess.run([sys.executable, str(repo_root() / "train.py"), *flags], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--resume latest" in proc.stderr


def test_nonfinite_loss_stops_with_message_and_checkpoint(demo_data, micro_model_json, tmp_path, monkeypatch):
    import torch

    import vlp.train.loop as loop
    from vlp.runtime import checkpoint as ckpt
    from vlp.train import trainer as trainer_module

    calls = {"n": 0}
    real_step = trainer_module.train_step

    def step_that_blows_up(*args, **kwargs):
        calls["n"] += 1
        losses = real_step(*args, **kwargs)
        if calls["n"] == 3:
            losses["loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(trainer_module, "train_step", step_that_blows_up)
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "nan", "--max-steps", "10"))
    with pytest.raises(loop.TrainingError, match=r"loss is nan at step 3; the state before this step is saved in"):
        train(cfg)
    saved = ckpt.resolve_resume("latest", tmp_path / "nan" / "checkpoints")
    assert ckpt.load_state(saved)["step"] == 2


def test_alignment_and_uniformity_close_the_modality_gap(demo_data, micro_model_json, tmp_path):
    """CUA (CLIP + alignment + uniformity, the contrastive-gap paper) vs plain CLIP, same seed and budget."""
    retrieval = demo_data["eval_data"][2]
    gap, cosine = {}, {}
    for name, extra in {"clip": [], "cua": ["--alignment-weight", "1", "--uniformity-weight", "1"]}.items():
        cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, name, "--max-steps", "40",
                                  "--log-every", "40", "--eval-data", retrieval, *extra))
        result = train(cfg)
        gap[name] = result["eval/wds/demo_retrieval/geometry/modality_gap"]
        cosine[name] = result["eval/wds/demo_retrieval/geometry/mean_paired_cosine"]
        if name == "cua":
            assert result["train/alignment"] > 0 and result["train/uniformity"] < 0
    assert gap["cua"] < 0.7 * gap["clip"], gap
    assert cosine["cua"] > cosine["clip"], cosine


def test_locked_image_tower_stays_fixed_under_bf16_and_checkpointing(demo_data, micro_model_json, tmp_path):
    """LiT-style locking, activation checkpointing and bf16 autocast together: the text tower learns,
    the image tower does not move."""
    import torch

    from vlp.models import read_state_dict

    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "lit", "--max-steps", "4", "--save-every", "1",
                              "--keep-checkpoints", "10", "--lock-image", "--grad-checkpointing",
                              "--precision", "amp_bf16"))
    train(cfg)
    ckpts = tmp_path / "lit" / "checkpoints"
    first, last = read_state_dict(str(ckpts / "step_00000001.pt")), read_state_dict(str(ckpts / "step_00000004.pt"))
    assert all(torch.equal(first[k], last[k]) for k in first if k.startswith("visual."))
    assert not torch.equal(first["text_projection"], last["text_projection"])
