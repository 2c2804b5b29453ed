"""The typed config: YAML and flags fill the same fields, flags win, bad input is one clear line."""
import subprocess
import sys

import pytest

from tests.conftest import repo_root
from vlp.config import ConfigError, parse_config


def test_yaml_flat_and_sectioned_with_flag_override(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("batch_size: 16\noptim:\n  lr: 0.01\n  accum_freq: 2\nrrc_scale: [0.5, 1.0]\n")
    cfg = parse_config(["--config", str(y), "--lr", "0.002", "--dataset-resampled"])
    assert cfg.data.batch_size == 16 and cfg.optim.accum_freq == 2
    assert cfg.optim.lr == 0.002  # the flag overrides the file
    assert cfg.data.rrc_scale == (0.5, 1.0) and cfg.data.dataset_resampled is True
    assert cfg.model.model == "ViT-B-32"  # untouched defaults survive


@pytest.mark.parametrize("argv, message", [
    (["--local-loss"], "--local-loss needs --gather-with-grad"),
    (["--batch-size", "many"], "cannot read 'many' as int"),
    (["--precision", "fp8"], "--precision must be"),
    (["--lr-scheduler", "const-cooldown"], "needs --epochs-cooldown"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_fail_fast(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_unknown_yaml_key_names_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("batchsize: 3\n")
    with pytest.raises(ConfigError, match=f"unknown option 'batchsize' in {y}"):
        parse_config(["--config", str(y)])


def test_cli_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, str(repo_root() / "train.py"), "--local-loss"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --local-loss needs --gather-with-grad: without it the gradients are biased"
