"""--resume refuses a model config that differs from the checkpoint's stored one (same shapes load, as another
model: head_width 16 -> 8 and text heads 2 -> 1 trained to the end with no word), in one line naming the fields;
--allow-model-change says the change is meant."""
from __future__ import annotations

import json

import pytest

from tests.conftest import MICRO_CFG
from vlp.config import ConfigError, parse_config
from vlp.model_drift import drift
from vlp.train.loop import train


def test_drift_names_each_changed_leaf():
    a = {"embed_dim": 32, "vision_cfg": {"head_width": 32, "layers": 2}, "text_cfg": {"heads": 4}}
    b = {"embed_dim": 32, "vision_cfg": {"head_width": 64, "layers": 2}, "text_cfg": {"heads": 2, "pad_id": 0}}
    assert drift(json.dumps(a), b) == ["text_cfg.heads 4 -> 2", "text_cfg.pad_id absent -> 0",
                                       "vision_cfg.head_width 32 -> 64"]
    assert drift(a, json.loads(json.dumps(a))) == []


def _flags(demo_data, model_json, logs, *extra):
    return ["--train-data", demo_data["train_data"], "--model", model_json, "--logs", str(logs), "--name", "drift",
            "--batch-size", "16", "--workers", "0", "--report-to", "none", "--no-progress", "--save-every", "1", *extra]


def test_resume_with_a_changed_model_config_is_refused(demo_data, micro_model_json, tmp_path, capsys):
    train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "--max-steps", "1")))
    changed = json.loads(json.dumps(MICRO_CFG))
    changed["vision_cfg"]["head_width"] = 8          # 32 wide: 2 heads -> 4 heads, every shape the same
    changed["text_cfg"]["heads"] = 1
    other = tmp_path / "vlp-micro.json"            # the same model name, another config
    other.write_text(json.dumps(changed))
    resume = _flags(demo_data, str(other), tmp_path, "--max-steps", "2", "--resume", "latest")
    with pytest.raises(ConfigError) as e:
        train(parse_config(resume))
    message = str(e.value)
    assert "\n" not in message and "--allow-model-change" in message, message
    assert "vision_cfg.head_width 16 -> 8" in message and "text_cfg.heads 2 -> 1" in message, message
    result = train(parse_config(resume + ["--allow-model-change"]))
    assert "train/loss" in result and "at step 1" in capsys.readouterr().err   # resumed, trained on
