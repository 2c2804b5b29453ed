"""FSDP2 (`--fsdp`): parameters, gradients and optimiser state sharded over the ranks, for towers
too large to replicate on every device.

accelerate (1.15) switches its FSDP plugin on only for multi-GPU runs (its CPU branch keeps DDP),
so vlp calls torch's FSDP2 `fully_shard` itself, the call accelerate's plugin makes: the same code
then runs on GPUs and on CPU processes (gloo), where the tests run it. Each transformer block
(open_clip's, timm's, Hugging Face's: any repeated block list) is its own shard unit (gathered for its forward and
backward only), then the root holds the rest.
`--fsdp-sharding full` frees a block's gathered parameters after its forward (ZeRO-3);
`grad-op` keeps them until the backward (ZeRO-2: more memory, one all-gather less per step).
Under `--precision amp_bf16` the blocks are gathered in bf16 and their gradients reduced in float32
(`MixedPrecisionPolicy`, torchtitan's choice: half the all-gather bytes); the root stays float32 (its
`logit_scale` feeds the loss, which computes in float32). With `--accum-freq k` every micro-step reduce-scatters
its gradients, so each rank keeps only its shard of them; `--fsdp-accum-no-sync` trades memory for communication:
only the last micro-step reduce-scatters, and until then every rank holds every unit's whole float32 gradient
(FSDP2's `set_requires_gradient_sync(False)`, 4 bytes per parameter per rank, as much as DDP).
`vlp.train.parallelize` calls `shard_model` in its place among precision, compile and DDP.

Checkpoints hold the optimiser and model as the ranks hold them (torch.distributed.checkpoint: each rank
writes its DTensor shards, `vlp.train.checkpointer`), plus the model read back into one ordinary state dict
(export, eval_zeroshot and open_clip read it as from any other run); DCP reshards on load, so an `--fsdp`
checkpoint resumes an `--fsdp` run on any number of ranks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from vlp import compat
from vlp import precision as prec
from vlp.compat import require_fsdp2
from vlp.config import ConfigError

SHARDINGS = ("full", "grad-op")
SCALARS_ATTR = "_vlp_fsdp_scalars"  # names of 0-dim parameters stored as shape [1] while sharded
RESHARD_ATTR = "_vlp_fsdp_reshard"  # the blocks' reshard_after_forward (--fsdp-sharding full)
NO_SYNC_ATTR = "_vlp_fsdp_accum_no_sync"  # --fsdp-accum-no-sync


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, SCALARS_ATTR)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The shard units: the members of every repeated block list, outermost first found. A block list is an
    `nn.ModuleList` (of one or more) or `nn.Sequential` (of two or more) whose members are all one class, each a
    module with children of its own: open_clip's `resblocks`, timm's `blocks` (Sequential), Hugging Face's
    `encoder.layer`/`encoder.layers` (ModuleList). Anything left out of a unit falls into the root, which stays
    gathered from its forward to its backward on every rank."""
    units: list[torch.nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or not isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        members = list(m.children())
        if len(members) < (1 if isinstance(m, torch.nn.ModuleList) else 2):
            continue
        if len({type(b) for b in members}) == 1 and all(any(True for _ in b.children()) for b in members):
            units.extend(members)
            inside.update(id(x) for b in members for x in b.modules())
    return units


def shard_model(model: torch.nn.Module, sharding: str, device: torch.device, precision: str = "fp32",
                accum_no_sync: bool = False) -> torch.nn.Module:
    """Shard `model` in place over every rank of the default process group; call it before building the
    optimiser (the parameters become DTensors). `precision`: the run's resolved --precision. `accum_no_sync`
    (--fsdp-accum-no-sync): accumulation micro-steps keep every unit's whole gradient, unsharded and in float32,
    on every rank (4 bytes per parameter, as DDP) and reduce-scatter once per step; by default each micro-step
    reduce-scatters and only this rank's shard of the gradients is kept."""
    fully_shard = require_fsdp2("--fsdp")
    if precision == "auto" or prec.fsdp_refusal(precision):   # config validation refuses these at parse time
        raise ConfigError(prec.fsdp_refusal(precision) or "shard_model takes a resolved --precision, not auto")
    if not torch.distributed.is_initialized():
        raise ConfigError("--fsdp needs several processes (torchrun or accelerate launch)")
    from torch.distributed.device_mesh import init_device_mesh

    model.to(device)
    from vlp.train.telemetry import tower_flops

    try:  # the counter runs forward on meta stand-ins, which the sharded model's hooks would try to gather
        model._vlp_tower_flops = tower_flops(model)
    except Exception:  # noqa: BLE001 - no FLOPs figure (banner, MFU); training goes on
        model._vlp_tower_flops = None
    # FSDP2 shards along dim 0 and refuses 0-dim parameters (logit_scale, logit_bias): hold them as [1].
    scalars = [name for name, p in model.named_parameters() if p.ndim == 0]
    for name in scalars:
        owner, attr = _owner(model, name)
        old = getattr(owner, attr)
        setattr(owner, attr, torch.nn.Parameter(old.detach().reshape(1), requires_grad=old.requires_grad))
    # Ranks are seeded apart (set_seed(device_specific=True)); DDP broadcasts rank 0's weights, FSDP2 would
    # shard each rank's own: start every rank from rank 0's.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    reshard = sharding == "full"
    policy = {}
    if precision != "fp32":  # bf16 autocast: the blocks' all-gathers in bf16, their reductions in float32
        policy = {"mp_policy": compat.fsdp2_mixed_precision()(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, **policy)
    # The root's parameters stay gathered from its forward to its backward (FSDP2's advice for the root),
    # which the loss needs: open_clip's forward returns `logit_bias` itself, not a copy, and resharding
    # would free the storage under it.
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    setattr(model, SCALARS_ATTR, scalars)
    setattr(model, RESHARD_ATTR, reshard)
    setattr(model, NO_SYNC_ATTR, accum_no_sync)
    return model


def accumulates_unsharded(model: torch.nn.Module) -> bool:
    """Whether a sharded model skips the reduce-scatter on accumulation micro-steps (--fsdp-accum-no-sync)."""
    return bool(getattr(model, NO_SYNC_ATTR, False))


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The shard units of a sharded model (its blocks, then the root last), in the same order on every rank."""
    units = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard") and m is not model]
    return units + [model]


def can_gather_for_eval(model: torch.nn.Module) -> bool:
    """Whether this torch lets a shard unit stay gathered through its forwards (FSDP2 set_reshard_after_forward)."""
    return is_sharded(model) and all(hasattr(m, "set_reshard_after_forward") for m in fsdp_modules(model))


@contextmanager
def gathered(model: torch.nn.Module):
    """Every weight of a sharded model gathered on every rank for the block (collective on entry and exit; a no-op
    when not sharded), kept gathered through the forwards inside it: evaluation then runs no collective inside a
    forward, so each rank encodes its own share of the work in its own number of batches, and the code that reads
    weights outside `forward()` (`encode_image`/`encode_text`, the prefix-sharing text encoder) sees whole tensors.
    Costs the model's full weights on every rank for the duration (no gradients, no optimiser state).
    Yields whether ranks may split the work (False on a torch without `set_reshard_after_forward`: there only
    the root is gathered and every forward stays collective)."""
    if not is_sharded(model):
        yield True
        return
    if not can_gather_for_eval(model):  # older torch: only the root gathered; every rank must run every forward
        model.unshard()
        try:
            yield False
        finally:
            model.reshard()
        return
    units = fsdp_modules(model)
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield True
    finally:
        reshard = getattr(model, RESHARD_ATTR, True)
        for m in units:
            m.set_reshard_after_forward(reshard and m is not model, recurse=False)
            m.reshard()


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; collective when sharded (every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def state_dict_options(full: bool = True, **kw):
    """torch.distributed.checkpoint's options: the full (gathered) form, or each rank's own shard (`full=False`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, **kw)


def _plain_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def full_state(model: torch.nn.Module, optimizer=None) -> tuple[dict, Optional[dict]]:
    """Gathered (model state dict with the original shapes, optimiser state keyed by parameter name), complete on
    the main process (other ranks get empty dicts). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=state_dict_options(cpu_offload=True))
    for name in getattr(model, SCALARS_ATTR):
        if name in model_state:
            model_state[name] = model_state[name].reshape(())
    optim_state = None
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, _plain_optimizer(optimizer),
                                               options=state_dict_options(cpu_offload=True))
    return model_state, optim_state


def load_full_state(model: torch.nn.Module, model_state: dict, optimizer=None, optim_state: Optional[dict] = None) -> None:
    """Shard a full state (as `full_state` returns it; every rank passes it) into the model and optimiser."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_state = dict(model_state)
    for name in getattr(model, SCALARS_ATTR):
        if name in model_state:
            model_state[name] = model_state[name].reshape(1)
    set_model_state_dict(model, model_state, options=state_dict_options())
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, _plain_optimizer(optimizer), optim_state, options=state_dict_options())
