"""The run's checkpointer: what a run's state is, saved through torch.distributed.checkpoint and restored on
any number of ranks.

The state (`_dcp_state`): the model and the optimiser by parameter name (`get_state_dict`: plain tensors under
DDP, written once; DTensor shards under --fsdp, each written by its owner), the step, epoch, scheduler and
scaler (`train`), and under `loader/rankR` and `rng/rankR` each rank's loader position and RNG streams, so
that a resume on another world size reads every old rank's position (`vlp.data.plan.replan`). Small values
are stored as uint8 tensors of weights_only torch.save bytes: loading them executes no pickled code. How the
files are written and committed: `vlp.runtime.dcp_checkpoint`. Only finite weights are ever written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from vlp.config import ConfigError
from vlp.data.plan import replan
from vlp.distributed import cpu_group, gather_objects, main_work_group
from vlp.model_drift import drift, refusal
from vlp.runtime import checkpoint as ckpt
from vlp.runtime import dcp_files as F
from vlp.runtime import rng_state
from vlp.runtime.dcp_checkpoint import DcpSaver
from vlp.train import sharding
from vlp.train.checkpoint_v1 import restore_v1
from vlp.train.health import TrainingError, all_finite


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False)


class Checkpointer:
    """Saves and restores model, optimiser, scheduler, scaler, RNGs and loader positions of a run."""

    def __init__(self, ckpt_dir: Path, accelerator, net, optimizer, scheduler, loader, cfg, identity: dict,
                 say: Callable[[str], None] = print):
        self.dir, self.accelerator = ckpt_dir, accelerator
        self.net, self.optimizer, self.scheduler, self.loader = net, optimizer, scheduler, loader
        self.cfg, self.identity = cfg, identity
        self.saved: tuple = (None, None)  # (step, path) of the last save: a stop right after it does not rewrite it
        # every rank makes the groups here, in the same order: background writes get a CPU group of their own
        main_work_group()
        self.saver = DcpSaver(ckpt_dir, cfg.run.keep_checkpoints, cpu_group(), say=say)

    def finite(self) -> bool:
        """Whether the weights are finite on every rank (an exact check; run at each save only)."""
        return all(gather_objects(all_finite(self.net.state_dict().values())))

    def save(self, step: int, epoch: int, background: bool = False) -> Optional[Path]:
        """Write the checkpoint of `step` (every rank calls this). Returns its path on the main process (None
        elsewhere, and for a `background` save, which is only staged when this returns: `poll` reports it)."""
        if self.saved[0] == step:
            self.saver.wait()   # a background save of this step: done, or failed and written again now
            if self.saver.failed != step:
                return self.saved[1] if self.accelerator.is_main_process else None
        if not self.finite():
            raise TrainingError(f"the weights are not finite at step {step}; nothing saved. {self.last_finite()}")
        background = background and self.cfg.run.async_save
        path = self.saver.save(step, self._dcp_state(step, epoch), self._main_state(step, epoch), background)
        self.saved = (step, path if not background else self.dir / ckpt.checkpoint_name(step))
        return self.saved[1] if self.accelerator.is_main_process else None

    def poll(self) -> None:
        """Report a background save that has finished (one line if it failed)."""
        self.saver.poll()

    def _dcp_state(self, step: int, epoch: int) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        acc, rank = self.accelerator, self.accelerator.process_index
        model, optim = get_state_dict(self.net, sharding._plain_optimizer(self.optimizer), options=_options())
        train = {"step": step, "epoch": epoch, "scheduler": self.scheduler.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                 "param_groups": optim["param_groups"], "world_size": acc.num_processes,
                 "workers": self.cfg.data.workers, "fsdp": sharding.is_sharded(self.net)}
        return {"model": model, "optim": optim["state"], "train": F.as_bytes_tensor(train),
                f"loader/rank{rank}": F.as_bytes_tensor(self.loader.state_dict()),
                f"rng/rank{rank}": F.as_bytes_tensor(rng_state.capture())}

    def _main_state(self, step: int, epoch: int) -> dict:
        """What the main file holds besides the consolidated model (weights_only-safe types)."""
        return {"step": step, "epoch": epoch, "world_size": self.accelerator.num_processes,
                "fsdp": sharding.is_sharded(self.net),
                "fsdp_scalars": sorted(getattr(self.net, sharding.SCALARS_ATTR, ())),
                "config": json.dumps(self.cfg.to_dict()), **self.identity}

    def save_before_failure(self, step: int, epoch: int) -> str:
        """Save the state before a failed step if it is finite; says where the last finite state is."""
        if self.finite():
            return f"the state before this step is saved in {self.save(step, epoch)}"
        return f"the state before this step is not finite either. {self.last_finite()}"

    def last_finite(self) -> str:
        self.saver.wait()
        found = ckpt.list_checkpoints(self.dir)
        if not found:
            return "No checkpoint of this run holds finite weights."
        return f"The last finite checkpoint is {found[-1][1]} (resume with --resume {found[-1][1]})."

    def close(self) -> None:
        """Let a background save finish (its failure reported)."""
        self.saver.close()

    def restore(self, path: Path) -> tuple[int, int, dict]:
        """Load `path` into the run; returns (step, epoch, this rank's loader state)."""
        acc = self.accelerator
        ckpt.on_main(lambda: ckpt.check(path))  # one rank reads every byte to verify, not each of them
        main = ckpt.load_state(path, checked=True, parts=False)
        if not isinstance(main, dict) or not (main.get("dcp") or "optimizer" in main):
            raise ConfigError(f"{path} is not a vlp training checkpoint (no training state): to start from its "
                              f"weights use --pretrained instead of --resume")
        changes = drift(main["model_cfg"], self.identity["model_cfg"]) if "model_cfg" in main else []
        if changes and not self.cfg.model.allow_model_change:   # same shapes load, as another model
            raise ConfigError(refusal(str(path), changes))
        if main.get("dcp"):
            train, loaders = self._restore_dcp(path, main)
        else:  # vlp's earlier format
            main = ckpt.load_state(path, checked=True)
            train = {k: main.get(k) for k in ("step", "epoch", "scheduler", "scaler")}
            loaders = restore_v1(self.net, self.optimizer, acc.num_processes, acc.process_index, path, main)
            rng_state.restore(main["rng"][acc.process_index])
        self.scheduler.load_state_dict(train["scheduler"])
        if acc.scaler is not None and train.get("scaler"):
            acc.scaler.load_state_dict(train["scaler"])
        if Path(path).resolve().parent == self.dir.resolve():  # already saved: a stop right away rewrites nothing
            self.saved = (train["step"], Path(path))
        return train["step"], train["epoch"], self._loader_state(loaders, train)

    def _loader_state(self, loaders: list, train: dict) -> dict:
        """This rank's loader state: its own when ranks and workers are as saved; otherwise the interrupted
        epoch's unconsumed samples planned over the new ranks and workers (exactly once)."""
        acc = self.accelerator
        return replan(loaders, acc.process_index, acc.num_processes, max(1, self.cfg.data.workers))

    def _restore_dcp(self, path: Path, main: dict) -> tuple[dict, list]:
        """Read the DCP folder of `path` resharded onto this run; returns (train state, every old rank's loader)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        sharded = sharding.is_sharded(self.net)
        if bool(main.get("fsdp")) != sharded:   # (0-dim parameters are stored as [1] shards under --fsdp)
            raise ConfigError(f"{path} was written {'with' if main.get('fsdp') else 'without'} --fsdp; "
                              f"resume it {'with' if main.get('fsdp') else 'without'} --fsdp")
        folder, rank = path.with_name(main["dcp"]), self.accelerator.process_index
        held = F.entries(folder)
        optimizer = sharding._plain_optimizer(self.optimizer)
        model, optim = get_state_dict(self.net, optimizer, options=_options())
        extra = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in held.items()
                 if k == "train" or k.startswith("loader/") or k == f"rng/rank{rank}"}
        state = {"model": model, "optim": optim["state"], **extra}
        try:
            group = main_work_group()
            dcp.load(state, checkpoint_id=str(folder), process_group=group, no_dist=group is None)
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ConfigError(f"{path} does not fit this architecture ({F.failure_line(e)}): resume with the run's "
                              f"own --model") from None
        train = F.from_bytes_tensor(state["train"])
        set_state_dict(self.net, optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"], "param_groups": train["param_groups"]},
                       options=_options())
        if f"rng/rank{rank}" in state:   # a rank the old run did not have keeps its own seeded streams
            rng_state.restore(F.from_bytes_tensor(state[f"rng/rank{rank}"]))
        old = int(train["world_size"])
        return train, [F.from_bytes_tensor(state[f"loader/rank{r}"]) for r in range(old)]
