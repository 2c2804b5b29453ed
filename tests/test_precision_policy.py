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


def test_eval_follows_the_training_precision(demo_data, micro_model_json, tmp_path):
    """A checkpoint trained under bf16 autocast is scored under bf16 autocast by `vlp eval --precision auto`
    (on CUDA the evaluator's own choice would be fp16, where a bf16-trained model can overflow), unless told."""
    import eval_zeroshot
    from tests.test_train_loop import _flags
    from vlp import precision as prec
    from vlp.train.loop import train

    assert prec.autocast_dtype(prec.for_eval("auto", "amp_bf16")) == torch.bfloat16   # what CUDA would get
    assert prec.for_eval("fp32", "amp_bf16") == "fp32" and prec.for_eval("auto", None) == "auto"
    train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "bf16", "--precision", "amp_bf16",
                              "--max-steps", "1", "--workers", "0")), show_final_eval=False)
    ckpt = next((tmp_path / "bf16" / "checkpoints").glob("step_*.pt"))
    seen = set()

    def hook(module, args, out):
        seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        for asked, expect in (("auto", {torch.bfloat16}), ("fp32", {torch.float32})):
            seen.clear()
            assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", demo_data["eval_data"][0], "--quiet",
                                       "--workers", "0", "--device", "cpu", "--precision", asked,
                                       "--output", str(tmp_path / f"eval-{asked}")]) == 0
            assert seen == expect, (asked, seen)
    finally:
        handle.remove()
