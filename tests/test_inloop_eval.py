"""In-loop evaluation runs in the run's precision: amp_bf16 runs score in bf16, fp32 runs in fp32, and
the evaluator's own autocast (fp16 on CUDA) never overrides it."""
from __future__ import annotations

import types

import pytest
import torch

import vlp.eval
from vlp.config import Config
from vlp.train.inloop_eval import InLoopEval


class _Acc:
    def __init__(self, device):
        self.device, self.is_main_process, self.num_processes = torch.device(device), True, 1

    def wait_for_everyone(self):
        pass


def _run(monkeypatch, precision: str, device: str) -> dict:
    seen = {}

    def fake_evaluate(net, tokenizer, preprocess, sets, **kw):
        seen["amp"] = kw.get("amp")
        seen["enabled"] = torch.is_autocast_enabled("cpu")
        seen["dtype"] = torch.get_autocast_dtype("cpu")
        return [{"dataset": "d", "metrics": {"acc1": 0.5}}]

    monkeypatch.setattr(vlp.eval, "evaluate", fake_evaluate)
    cfg = Config()
    cfg.run.precision = precision
    logged = []
    bundle = types.SimpleNamespace(tokenizer=None, preprocess_val=None, model_name="m")
    ev = InLoopEval(cfg, bundle, _Acc(device), types.SimpleNamespace(log=lambda step, flat: logged.append(flat)),
                    sets=["an opened set"])
    assert ev(torch.nn.Linear(2, 2), 3) == {"eval/d/acc1": 0.5} and logged
    return seen


@pytest.mark.filterwarnings("ignore:User provided device_type")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_evaluator_autocast_is_off(monkeypatch, device):
    # left at its default (None), evaluate() turns on fp16 autocast on CUDA, inside the run's bf16 one
    assert _run(monkeypatch, "amp_bf16", device)["amp"] is False


@pytest.mark.parametrize("precision, enabled, dtype", [("amp_bf16", True, torch.bfloat16), ("fp32", False, None),
                                                        ("auto", False, None)])
def test_scores_in_the_runs_precision(monkeypatch, precision, enabled, dtype):
    seen = _run(monkeypatch, precision, "cpu")
    assert seen["enabled"] is enabled
    if enabled:
        assert seen["dtype"] == dtype
