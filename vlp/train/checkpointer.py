"""The run's checkpointer: saves every rank's state as one checkpoint and restores it.

Each rank has its own RNG streams and loader position; all of them go into the checkpoint's main file
(rank order), and on resume each rank takes its own back. The model (gathered under --fsdp) is in the
main file too, written by rank 0; the optimiser state is written by all ranks at once, each its share (see
`vlp.runtime.checkpoint`), through the single atomic writer of `vlp.runtime.atomic_file`. Only finite weights
are ever written, and every rank learns whether the write worked (a full disk on one process must not
leave the other ranks waiting).
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Optional

from vlp.config import ConfigError
from vlp.data.plan import replan
from vlp.model_drift import drift, refusal
from vlp.runtime import checkpoint as ckpt
from vlp.train.health import TrainingError, all_finite
from vlp.runtime import rng_state
from vlp.train import optim_shards, sharding


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


def per_rank(accelerator, obj) -> list:
    """`obj` from every rank, in rank order (a one-element list in a single process)."""
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Saves and restores model, optimiser, scheduler, scaler, RNGs and loader positions of a run."""

    def __init__(self, ckpt_dir: Path, accelerator, net, optimizer, scheduler, loader, cfg, identity: dict):
        self.dir, self.accelerator = ckpt_dir, accelerator
        self.net, self.optimizer, self.scheduler, self.loader = net, optimizer, scheduler, loader
        self.cfg, self.identity = cfg, identity
        self.saved: tuple = (None, None)  # (step, path) of the last save: a stop right after it does not rewrite it

    def finite(self) -> bool:
        """Whether the weights are finite on every rank (an exact check; run at each save only)."""
        return all(per_rank(self.accelerator, all_finite(self.net.state_dict().values())))

    def save(self, step: int, epoch: int) -> Optional[Path]:
        """Write the checkpoint of `step` (every rank must call this); returns its path on the main process.
        Under several processes each rank writes its share of the optimiser state (with --fsdp: the shard it
        holds, never gathered) while rank 0 writes the rest: the write takes about 1/world of the time, but
        never less than the model's own bytes (in the main file, where open_clip finds them)."""
        if self.saved[0] == step:
            return self.saved[1]
        if not self.finite():
            raise TrainingError(f"the weights are not finite at step {step}; nothing saved. {self.last_finite()}")
        acc = self.accelerator
        rank, world = acc.process_index, acc.num_processes
        rngs, loaders = per_rank(acc, rng_state.capture()), per_rank(acc, self.loader.state_dict())
        sharded = sharding.is_sharded(self.net)
        if sharded:  # the model gathered onto the main process (every rank takes part); the optimiser as sharded
            model_state = sharding.full_state(self.net)[0]
            main_optim = mine = optim_shards.local_state(self.net, self.optimizer)
        else:
            model_state, main_optim = self.net.state_dict(), self.optimizer.state_dict()
            if world > 1:
                shares = split_by_bytes(main_optim["state"], world, first=ckpt.state_bytes(model_state))
                main_optim, mine = {**main_optim, "state": shares[0]}, shares[rank]
        split = world > 1
        if split:
            token = per_rank(acc, secrets.token_hex(4))[0]  # names this save's parts apart from any earlier ones
            names = [ckpt.part_name(step, token, r) for r in range(world)]
        asked: list = []

        def written(error: Optional[str] = None) -> Optional[str]:
            """Every rank's file written? (collective, once per save; rank 0 asks before committing)"""
            asked.append([e for e in per_rank(acc, error) if e])
            return asked[0][0] if asked[0] else None

        path, error = None, None
        try:
            if acc.is_main_process:
                state = {
                    "step": step, "epoch": epoch, "fsdp": sharded,
                    "model": model_state,
                    "state_dict": model_state,  # where open_clip looks (pretrained=step_N.pt); stored once
                    "optimizer": main_optim,
                    "parts": names[1:] if split else [],
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "rng": rngs, "loader": loaders,
                    "config": json.dumps(self.cfg.to_dict()), **self.identity,
                }
                path = ckpt.save_checkpoint(self.dir, step, state, self.cfg.run.keep_checkpoints,
                                            ready=written if split else None)
            elif split:
                ckpt.save_part(self.dir, names[rank], {"step": step, "optimizer_state": mine})
        except ckpt.CheckpointWriteError as e:
            error = str(e)
        if split and not asked:
            written(error)  # this rank's part (or rank 0's main file that failed before asking)
        errors = [e for e in per_rank(acc, error) if e]  # also the barrier after the commit
        if errors:
            raise ckpt.CheckpointWriteError(errors[0])
        self.saved = (step, path)
        return path

    def save_before_failure(self, step: int, epoch: int) -> str:
        """Save the state before a failed step if it is finite; says where the last finite state is."""
        if self.finite():
            return f"the state before this step is saved in {self.save(step, epoch)}"
        return f"the state before this step is not finite either. {self.last_finite()}"

    def last_finite(self) -> str:
        found = ckpt.list_checkpoints(self.dir)
        if not found:
            return "No checkpoint of this run holds finite weights."
        return f"The last finite checkpoint is {found[-1][1]} (resume with --resume {found[-1][1]})."

    def restore(self, path: Path) -> tuple[int, int, dict]:
        """Load `path` into the run; returns (step, epoch, this rank's loader state)."""
        acc = self.accelerator
        ckpt.on_main(lambda: ckpt.check(path))  # one rank reads every byte to verify, not each of them
        state = ckpt.load_state(path, checked=True)  # mapped: the ranks of a machine share its pages
        missing = [k for k in ("model", "optimizer", "scheduler", "rng", "loader", "step") if k not in state]
        if missing:
            raise ConfigError(f"{path} is not a vlp training checkpoint (no {', '.join(missing)}): "
                              f"to start from its weights use --pretrained instead of --resume")
        changes = drift(state["model_cfg"], self.identity["model_cfg"]) if "model_cfg" in state else []
        if changes and not self.cfg.model.allow_model_change:   # same shapes load, as another model
            raise ConfigError(refusal(str(path), changes))
        sharded = sharding.is_sharded(self.net)
        if bool(state.get("fsdp")) != sharded:  # the optimiser states differ in form (by name vs by index)
            raise ConfigError(f"{path} was written {'with' if state.get('fsdp') else 'without'} --fsdp; "
                              f"resume it {'with' if state.get('fsdp') else 'without'} --fsdp")
        if len(state["rng"]) != acc.num_processes:
            raise ConfigError(f"{path} was written by {len(state['rng'])} processes; resume it with as many "
                              f"(this run has {acc.num_processes})")
        rank = acc.process_index
        try:
            if sharded and state.get("parts"):  # each rank wrote its own optimiser shard: it reads only that one
                sharding.load_full_state(self.net, state["model"])
                optim_shards.load_local_state(self.net, self.optimizer, state["optimizer"] if rank == 0 else
                                              ckpt.read_part(path, state["parts"][rank - 1]))
            elif sharded:  # written gathered by an earlier vlp
                sharding.load_full_state(self.net, state["model"], self.optimizer, state["optimizer"])
            else:
                self.net.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ConfigError(f"{path} does not fit this architecture ({ckpt.first_line(e, 1)}): "
                              f"resume with the run's own --model") from None
        if not sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        rng_state.restore(state["rng"][acc.process_index])
        if Path(path).resolve().parent == self.dir.resolve():  # already saved: a stop right away rewrites nothing
            self.saved = (state["step"], Path(path))
        # another --workers: the epoch's unconsumed samples re-planned over the new workers (exactly once)
        return state["step"], state["epoch"], replan(state["loader"], rank, acc.num_processes,
                                                     max(1, self.cfg.data.workers))
