"""`--fsdp` (FSDP2 fully_shard) under torchrun with 2 CPU processes (gloo): it trains as DDP does, resumes
exactly from its gathered checkpoints, evaluates in the loop (every rank takes part) and exports an
open_clip folder holding the gathered weights."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_train_distributed import _torchrun
from tests.test_train_loop import _losses
from vlp.config import ConfigError


def _common(demo_data, micro_model_json):
    return ["--train-data", demo_data["train_data"], "--model", micro_model_json, "--batch-size", "16",
            "--workers", "1", "--lr-scheduler", "const", "--warmup", "0", "--lr", "1e-3", "--log-every", "1",
            "--save-every", "2", "--report-to", "none", "--no-progress", "--precision", "fp32",
            "--loss", "siglip", "--grad-clip-norm", "1.0"]


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_exactly(demo_data, micro_model_json, tmp_path):
    common = _common(demo_data, micro_model_json)
    _torchrun([*common, "--name", "ddp", "--max-steps", "4"], tmp_path)
    _torchrun([*common, "--fsdp", "--name", "ref", "--max-steps", "4", "--eval-data", demo_data["eval_data"][0]],
              tmp_path)
    _torchrun([*common, "--fsdp", "--name", "split", "--max-steps", "2"], tmp_path)
    _torchrun([*common, "--fsdp", "--name", "split", "--max-steps", "4", "--resume", "latest"], tmp_path)

    ddp, ref, split = (_losses(tmp_path / n) for n in ("ddp", "ref", "split"))
    assert sorted(ref) == sorted(split) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert ref[step] == pytest.approx(ddp[step], rel=1e-4), step  # sharded = replicated training
        assert split[step] == pytest.approx(ref[step], abs=1e-6), step  # step-exact resume

    # in-loop evaluation ran (every rank scored; rank 0 logged) and the checkpoint holds gathered weights
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("eval/") for row in rows for k in row)
    state = torch.load(tmp_path / "ref" / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert state["fsdp"] is True and state["model"]["logit_scale"].shape == torch.Size([])

    # the export is an ordinary open_clip folder with the same weights as the final checkpoint
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ref' / 'export'}")
    exported = model.state_dict()
    assert set(exported) == set(state["model"])
    for k, v in state["model"].items():
        torch.testing.assert_close(exported[k], v, msg=k)
    ddp_state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert set(ddp_state["model"]) == set(state["model"])


def test_fsdp_refusals(tmp_path):
    from vlp.train import sharding

    with pytest.raises(ConfigError, match="--fsdp runs in fp32 or amp_bf16"):
        sharding.shard_model(torch.nn.Linear(2, 2), "full", torch.device("cpu"), "amp")
    with pytest.raises(ConfigError, match="several processes"):
        sharding.shard_model(torch.nn.Linear(2, 2), "full", torch.device("cpu"), "fp32")
    from vlp.config import Config, validate

    cfg = Config()
    cfg.model.fsdp_sharding = "zero3"
    with pytest.raises(ConfigError, match="fsdp-sharding"):
        validate(cfg)
