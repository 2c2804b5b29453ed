"""Resuming a checkpoint in the format vlp wrote before DCP: one `step_N.pt` holding the model, the optimiser
(its per-parameter states dealt between the ranks, each rank's share in `step_N.pt.partR-TOKEN` beside it; under
--fsdp each rank's own shard), every rank's RNG streams and loader position. Such a run resumes on the number of
processes that wrote it; its next save is in the DCP format (`vlp.runtime.dcp_checkpoint`), which resumes on any.
"""
from __future__ import annotations

import json
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


def split_by_bytes(state: dict, world: int, first: int = 0) -> list[dict]:
    """`state`'s entries (an optimiser's per-parameter states) dealt to `world` ranks so that their bytes are
    about equal, rank 0 already holding `first` bytes; the same on every rank (largest first, ties by rank)."""
    load, shares = [first] + [0] * (world - 1), [{} for _ in range(world)]
    sizes = {key: ckpt.state_bytes(value) for key, value in state.items()}
    for key in sorted(state, key=lambda k: (-sizes[k], str(k))):
        rank = min(range(world), key=lambda r: (load[r], r))
        shares[rank][key] = state[key]
        load[rank] += sizes[key]
    return shares


def save_v1(cp, step: int, epoch: int):
    """The earlier writer (kept to measure it beside DCP in benchmarks/checkpoint_io.py and to write the
    checkpoints that test the resume of that format): `cp`, a Checkpointer, saves `step` as one main file on
    rank 0 (model, RNGs and loader positions of every rank, its optimiser share) and the other ranks' optimiser
    shares beside it, committed by the main file's rename. Returns its path on the main process."""
    import secrets

    from vlp.runtime import rng_state
    from vlp.distributed import gather_objects

    acc = cp.accelerator
    rank, world = acc.process_index, acc.num_processes
    rngs, loaders = gather_objects(rng_state.capture()), gather_objects(cp.loader.state_dict())
    sharded = sharding.is_sharded(cp.net)
    if sharded:  # the model gathered onto the main process (every rank takes part); the optimiser as sharded
        model_state = sharding.full_state(cp.net)[0]
        main_optim = mine = optim_shards.local_state(cp.net, cp.optimizer)
    else:
        model_state, main_optim = cp.net.state_dict(), cp.optimizer.state_dict()
        if world > 1:
            shares = split_by_bytes(main_optim["state"], world, first=ckpt.state_bytes(model_state))
            main_optim, mine = {**main_optim, "state": shares[0]}, shares[rank]
    split = world > 1
    names = [ckpt.part_name(step, gather_objects(secrets.token_hex(4))[0], r) for r in range(world)] if split else []
    asked: list = []

    def written(error=None):
        """Every rank's file written? (collective, once per save; rank 0 asks before committing)"""
        asked.append([e for e in gather_objects(error) if e])
        return asked[0][0] if asked[0] else None

    path, error = None, None
    try:
        if acc.is_main_process:
            state = {"step": step, "epoch": epoch, "fsdp": sharded, "model": model_state, "state_dict": model_state,
                     "optimizer": main_optim, "parts": names[1:],
                     "scheduler": cp.scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "rng": rngs, "loader": loaders, "config": json.dumps(cp.cfg.to_dict()), **cp.identity}
            path = ckpt.save_checkpoint(cp.dir, step, state, cp.cfg.run.keep_checkpoints,
                                        ready=written if split else None)
        elif split:
            ckpt.save_part(cp.dir, names[rank], {"step": step, "optimizer_state": mine})
    except ckpt.CheckpointWriteError as e:
        error = str(e)
    if split and not asked:
        written(error)
    errors = [e for e in gather_objects(error) if e]
    if errors:
        raise ckpt.CheckpointWriteError(errors[0])
    return path
