"""One precision policy for a run, resolved for CUDA on this CPU machine: `auto` under --fsdp is bf16 autocast
(accelerate, the shard units and the in-loop evaluation all agree), impossible combinations are refused when the
flags are parsed (before any model or loader is built), and evaluation follows the training precision."""
from __future__ import annotations

import pytest
import torch

from vlp.config import ConfigError, parse_config


def _cfg(*flags):
    return parse_config(["--train-data", "x.tar", *flags])


def test_fsdp_on_cuda_defaults_to_bf16_autocast(monkeypatch):
    from vlp import precision as prec
    from vlp.train.setup import run_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the CUDA branch, resolved on CPU
    fsdp = _cfg("--fsdp")
    assert run_precision(fsdp) == "amp_bf16"                         # what accelerate, FSDP units and eval get
    assert prec.accelerate_mixed_precision(run_precision(fsdp)) == "bf16"
    assert prec.fsdp_refusal(run_precision(fsdp)) is None            # shard_model accepts it
    assert run_precision(_cfg()) == "amp"                            # without --fsdp: open_clip's default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_precision(fsdp) == "fp32"


@pytest.mark.parametrize("name", ["amp", "fp16", "bf16", "pure_bf16", "pure_fp16"])
def test_fsdp_refuses_impossible_precisions_when_parsing(name):
    with pytest.raises(ConfigError, match="--fsdp runs in fp32 or amp_bf16") as e:
        _cfg("--fsdp", "--precision", name)
    assert "\n" not in str(e.value)
