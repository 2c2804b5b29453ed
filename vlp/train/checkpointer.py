"""The run's checkpointer: gathers every rank's state into one checkpoint and restores it.

Each rank has its own RNG streams and loader position; all of them go into the checkpoint
(rank order), and on resume each rank takes its own back. The bytes are written by
`vlp.train.checkpoint`'s single atomic writer on the main process only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from vlp.config import ConfigError
from vlp.train import checkpoint as ckpt


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

    def save(self, step: int, epoch: int) -> Optional[Path]:
        """Write the checkpoint of `step` (every rank must call this); returns its path on the main process."""
        acc = self.accelerator
        rngs, loaders = per_rank(acc, ckpt.rng_state()), per_rank(acc, self.loader.state_dict())
        path = None
        if acc.is_main_process:
            state = {
                "step": step, "epoch": epoch,
                "model": (weights := self.net.state_dict()),
                "state_dict": weights,  # where open_clip looks (pretrained=step_N.pt); the same tensors, stored once
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": rngs, "loader": loaders,
                "config": json.dumps(self.cfg.to_dict()), **self.identity,
            }
            path = ckpt.save_checkpoint(self.dir, step, state, self.cfg.run.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def restore(self, path: Path) -> tuple[int, int, dict]:
        """Load `path` into the run; returns (step, epoch, this rank's loader state)."""
        acc = self.accelerator
        state = ckpt.load_state(path)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) != acc.num_processes:
            raise ConfigError(f"{path} was written by {len(state['rng'])} processes; resume it with as many "
                              f"(this run has {acc.num_processes})")
        ckpt.set_rng_state(state["rng"][acc.process_index])
        return state["step"], state["epoch"], state["loader"][acc.process_index]
