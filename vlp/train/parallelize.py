"""One place that turns a built model into the one the trainer steps: precision, FSDP units, compile, DDP.

The order is torchtitan's (`parallelize_llama`): 16-bit weights are cast before sharding (a shard unit holds one
dtype), FSDP2 units are made before the optimiser exists (their parameters become DTensors), the module is
compiled inside DDP, `DDP(torch.compile(m))`: dynamo's DDPOptimizer still splits the compiled graph at DDP's
bucket boundaries, so each bucket's all-reduce overlaps the rest of the backward (DDP marks itself active around
its call of the inner module, and dynamo applies DDPOptimizer to any frame compiled under an active DDP,
torch/_dynamo/convert_frame.py). tests/test_train_distributed.py checks the split; benchmarks/compile_ddp.py
measured torch's documented order `torch.compile(DDP(m))` with the same split and 1.2-1.75x slower steps on 2
CPU ranks. A sharded model is left out of accelerate's prepare (accelerate would wrap it in DDP).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from vlp import precision as prec
from vlp.distributed import unwrap
from vlp.train import sharding

__all__ = ["parallelize", "unwrap", "gradient_sync_off"]


def parallelize(model: torch.nn.Module, cfg, accelerator, precision: str) -> torch.nn.Module:
    """`model` cast to `precision` (the run's resolved --precision), sharded into FSDP2 units (--fsdp), compiled
    (--torchcompile) and wrapped in DDP by accelerate (several processes, not sharded), in that order. Build the
    optimiser on `unwrap(result)` afterwards."""
    prec.cast_model(model, precision)  # open_clip's bf16/fp16/pure_*: 16-bit weights, no autocast
    if cfg.model.fsdp:
        model = sharding.shard_model(model, cfg.model.fsdp_sharding, accelerator.device, precision,
                                     accum_no_sync=cfg.model.fsdp_accum_no_sync)
    if cfg.model.torchcompile:
        model = torch.compile(model)
    if sharding.is_sharded(unwrap(model)):
        return model
    return accelerator.prepare(model)


@contextmanager
def gradient_sync_off(accelerator, model: torch.nn.Module):
    """An accumulation micro-step: no gradient communication under DDP (`no_sync`). A sharded model reduce-scatters
    anyway (its gradients stay sharded), unless --fsdp-accum-no-sync: then FSDP2's
    `set_requires_gradient_sync(False)` (accelerate's `no_sync` does nothing for a model it did not wrap)."""
    inner = unwrap(model)
    if not sharding.is_sharded(inner):
        with accelerator.no_sync(model):
            yield
        return
    if not sharding.accumulates_unsharded(inner):
        yield
        return
    inner.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        inner.set_requires_gradient_sync(True)
