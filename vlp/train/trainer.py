"""The Trainer: the model being trained, its optimiser, schedule and loss, and one optimiser step.

`vlp.train.loop.train` drives it over the epochs (with the run's checkpointer and evaluator attached), and the
benchmarks and tests drive the same object: what they measure is the step users run, its gradient-norm check and
its per-step agreement between ranks included.

    trainer = Trainer(cfg, accelerator, bundle.model, total_steps=..., steps_per_epoch=...)
    losses, verdict = trainer.step(micro_batches)        # forward, backward, check, optimiser step
    trainer.evaluate(step); trainer.save(step, epoch)    # with an evaluator / checkpointer attached
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from vlp.distributed import host_group, reduce_mean
from vlp.losses import clamp_logit_scale
from vlp.train import health, sharding
from vlp.train.health import TrainingError, Verdict
from vlp.train.parallelize import gradient_sync_off, parallelize, unwrap
from vlp.train.setup import run_precision
from vlp.train.step import train_step


class Trainer:
    """One optimiser step at a time of `model` as `cfg` configures it, on `accelerator`'s device(s)."""

    def __init__(self, cfg, accelerator, model: torch.nn.Module, *, total_steps: int, steps_per_epoch: int,
                 precision: Optional[str] = None):
        from vlp.losses import build_loss
        from vlp.train.optim import build_optimizer, build_scheduler

        self.cfg, self.accelerator = cfg, accelerator
        self.precision = precision or run_precision(cfg)
        self.model = parallelize(model, cfg, accelerator, self.precision)   # what steps: wrapped, compiled
        self.net = unwrap(self.model)   # the same parameters, plain: what is saved, evaluated, clamped
        optimizer = build_optimizer(self.net, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.optimizer = accelerator.prepare(optimizer)
        self.loss_fn = build_loss(cfg.loss, rank=accelerator.process_index, world_size=accelerator.num_processes)
        self.checkpointer = None   # the run's (vlp.train.checkpointer.Checkpointer), attached by train()
        self.evaluator = None      # the run's in-loop evaluator (vlp.train.inloop_eval.InLoopEval)
        self.check_every = check_every(cfg, accelerator.device)
        self.pending = health.PendingChecks(accelerator.device)
        if self.check_every > 1:
            host_group()   # made now, at the same point on every rank
        self.steps_done = 0
        self.model.train()

    def aim_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Re-aim the restored lr schedule at a run of `total_steps` (a resume on another number of ranks or
        workers): from the restored step on, lr is the schedule of a `total_steps` run at that step."""
        from vlp.train.optim import aim_scheduler, lr_multiplier

        aim_scheduler(self.scheduler, lr_multiplier(self.cfg.optim, total_steps, steps_per_epoch))

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
             fetch_next: Callable[[], bool] = lambda: True, stop: bool = False,
             number: Optional[int] = None) -> tuple[dict, Verdict]:
        """Forward and backward over the step's micro-batches, then the check every rank agrees on (finite loss
        and gradients, a stop signal, whether every rank has the next step's batches: `fetch_next` fetches them
        while the device still works on this step), then the optimiser step, unless the check found a problem
        (the gradients are then dropped). `number`: this step's number in the run (1-based). Returns the detached
        loss terms and the verdict. Off the steps --check-every reads, finiteness is only recorded on the device
        and found at the next read (`Verdict.at` says which step it was)."""
        acc = self.accelerator
        number = self.steps_done + 1 if number is None else number
        losses = train_step(self.model, micro_batches, self.loss_fn, backward=acc.backward, autocast=acc.autocast,
                            no_sync=lambda: gradient_sync_off(acc, self.model))
        checked = self.check_every == 1 or number % self.check_every == 0
        clip = self.cfg.optim.grad_clip_norm
        norm = health.checked_grad_norm(acc, self.model, clip) if clip or self.check_every == 1 else None
        more = fetch_next()
        if checked and not self.pending.pending:   # the exact check: one collective, one host read
            verdict = health.agree(losses["loss"], norm, stop, more)
        else:   # recorded on the device; on a checked step read with the unchecked ones before it, once
            self.pending.record(number, losses["loss"], norm)
            verdict = (self.read_pending(number) if checked else None) or health.agree_on_host(stop, more)
        if verdict.problem:
            self.optimizer.zero_grad(set_to_none=True)
            return losses, verdict
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.net)
        self.steps_done = number
        return losses, verdict

    def read_pending(self, now: int) -> Optional[Verdict]:
        """The verdict on the steps recorded since the last read, if one of them was not finite (collective)."""
        found = self.pending.read()
        if found is None:
            return None
        problem, at = found
        if at == now:   # the step being checked: reported as the exact check reports it
            return Verdict(problem, stop=False, more=False)
        return Verdict(f"{problem} at step {at} (found when step {now} was checked: --check-every "
                       f"{self.check_every})", stop=False, more=False, at=at)

    def figures(self, losses: dict) -> dict:
        """The step's loss terms averaged over ranks, the temperature (and SigLIP bias) and the learning rate."""
        net = self.net
        out = {f"train/{k}": reduce_mean(v.float()).item() for k, v in losses.items()}
        out["train/logit_scale"] = sharding.full_value(net.logit_scale).exp().item()
        if getattr(net, "logit_bias", None) is not None:
            out["train/logit_bias"] = sharding.full_value(net.logit_bias).item()
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def evaluate(self, step: int) -> dict:
        """The in-loop evaluation of the model as it is (every rank calls it); {} without an evaluator."""
        return self.evaluator(self.net, step) if self.evaluator is not None else {}

    def save(self, step: int, epoch: int, background: bool = False):
        """A checkpoint of `step` (every rank calls it); its path on the main process (`background`: written while
        training goes on, see `Checkpointer.save`). The steps not yet checked (--check-every) are checked first:
        a non-finite one stops the run with nothing saved."""
        late = self.read_pending(step)
        if late is not None:
            raise TrainingError(f"{late.problem}; nothing saved. {self.checkpointer.last_finite()}")
        return self.checkpointer.save(step, epoch, background=background)

    def save_before_failure(self, step: int, epoch: int) -> str:
        return self.checkpointer.save_before_failure(step, epoch)


def check_every(cfg, device) -> int:
    """--check-every resolved: every step off CUDA (the host is the device: reading costs nothing), --log-every on
    CUDA (the log reads the losses then anyway)."""
    if cfg.run.check_every:
        return cfg.run.check_every
    return cfg.run.log_every if torch.device(device).type == "cuda" else 1
