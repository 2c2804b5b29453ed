"""The end-of-step check without a host sync every step (--check-every N): the device's flags are read once
every N steps (no gradient norm is computed when nothing uses it), every save reads them first, and a non-finite
step never reaches a checkpoint."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.test_train_loop import _flags
from vlp.config import parse_config

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__"}


class Reads(TorchFunctionMode):
    """Counts the tensor reads that wait for the device (on CUDA), and gradient-norm computations; the optimiser's
    own step counters (host tensors torch keeps off the device) are not counted."""

    def __init__(self):
        super().__init__()
        self.reads = self.norms = 0
        self.in_optimizer = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not self.in_optimizer:
            self.reads += 1
        if name == "_foreach_norm":   # the fused gradient-norm pass (torch.nn.utils.get_total_norm)
            self.norms += 1
        return func(*args, **(kwargs or {}))


def _trainer(model_json: str, check_every: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vlp.config import Config, validate
    from vlp.models import create_model
    from vlp.train.trainer import Trainer

    cfg = Config()
    cfg.model.model, cfg.run.precision, cfg.run.check_every = model_json, "fp32", check_every
    validate(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    return Trainer(cfg, Accelerator(cpu=True), create_model(model_json).model, total_steps=6, steps_per_epoch=6)


def _count_reads(trainer, steps: int = 6) -> Reads:
    g = torch.Generator().manual_seed(0)
    batches = [[(torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 400, (4, 16), generator=g))]
               for _ in range(steps)]
    real_step, mode = trainer.optimizer.step, Reads()

    def optimizer_step(*a, **k):   # only marks the span: the optimiser runs unchanged
        mode.in_optimizer = True
        try:
            return real_step(*a, **k)
        finally:
            mode.in_optimizer = False
    trainer.optimizer.step = optimizer_step
    with mode:
        for micro in batches:
            _, verdict = trainer.step(micro)
            assert verdict.problem is None
    return mode


def test_flags_are_read_once_every_n_steps(micro_model_json):
    every_step = _count_reads(_trainer(micro_model_json, 1))
    assert every_step.reads >= 6 and every_step.norms >= 6      # the counter sees the per-step check
    lazy = _count_reads(_trainer(micro_model_json, 3))
    assert lazy.reads == 2, lazy.reads                           # steps 3 and 6 only
    assert lazy.norms == 0                                       # no clipping: no gradient norm at all


def test_a_nan_between_checks_is_never_saved(demo_data, micro_model_json, tmp_path, monkeypatch):
    """Weights turned NaN before step 3 with --check-every 5: step 3's NaN loss is recorded on the device only; the
    save at step 4 reads it first, saves nothing and names the last finite checkpoint (step 2)."""
    from vlp.runtime import checkpoint as ckpt
    from vlp.train import loop
    from vlp.train import trainer as trainer_module

    calls = {"n": 0}
    real_step = trainer_module.train_step

    def poisoned_step(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                getattr(model, "module", model).visual.proj.view(-1)[0] = float("nan")
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", poisoned_step)
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "lazy", "--workers", "0", "--save-every", "2",
                              "--check-every", "5", "--max-steps", "8"))
    with pytest.raises(loop.TrainingError, match=r"^loss is not finite at step 3 \(found when step 4 was checked: "
                                                 r"--check-every 5\); nothing saved\. The last finite checkpoint is "
                                                 r".*step_00000002\.pt"):
        loop.train(cfg)
    found = ckpt.list_checkpoints(tmp_path / "lazy" / "checkpoints")
    assert [s for s, _ in found] == [2]
    state = ckpt.load_state(found[0][1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
