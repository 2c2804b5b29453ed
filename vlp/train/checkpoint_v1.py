"""Resuming a checkpoint in the format vlp wrote before DCP: one `step_N.pt` holding the model, the optimiser
(its per-parameter states dealt between the ranks, each rank's share in `step_N.pt.partR-TOKEN` beside it; under
--fsdp each rank's own shard), every rank's RNG streams and loader position. Such a run resumes on the number of
processes that wrote it; its next save is in the DCP format (`vlp.runtime.dcp_checkpoint`), which resumes on any.
"""
from __future__ import annotations

from pathlib import Path

from vlp.config import ConfigError
from vlp.runtime import checkpoint as ckpt
from vlp.train import optim_shards, sharding


def restore_v1(net, optimizer, world: int, rank: int, path: Path, state: dict) -> list:
    """Load the model and optimiser of `state` (the main file of `path`, parts merged) into the run; returns
    the loader states of the ranks that wrote it. The caller restores scheduler, scaler and RNGs."""
    sharded = sharding.is_sharded(net)
    if bool(state.get("fsdp")) != sharded:  # the optimiser states differ in form (by name vs by index)
        raise ConfigError(f"{path} was written {'with' if state.get('fsdp') else 'without'} --fsdp; "
                          f"resume it {'with' if state.get('fsdp') else 'without'} --fsdp")
    if len(state["rng"]) != world:
        raise ConfigError(f"{path} was written by {len(state['rng'])} processes in vlp's earlier checkpoint format; "
                          f"resume it with as many (this run has {world}): its next save can resume on any number")
    try:
        if sharded and state.get("parts"):  # each rank wrote its own optimiser shard: it reads only that one
            sharding.load_full_state(net, state["model"])
            optim_shards.load_local_state(net, optimizer, state["optimizer"] if rank == 0 else
                                          ckpt.read_part(path, state["parts"][rank - 1]))
        elif sharded:  # written gathered
            sharding.load_full_state(net, state["model"], optimizer, state["optimizer"])
        else:
            net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(f"{path} does not fit this architecture ({ckpt.first_line(e, 1)}): "
                          f"resume with the run's own --model") from None
    if not sharded:
        optimizer.load_state_dict(state["optimizer"])
    return state["loader"]
