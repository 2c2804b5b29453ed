"""The training loop, readable top to bottom.

accelerate places the model and optimiser (CPU, one GPU, or many processes launched by
`accelerate launch`/`torchrun`) and handles mixed precision; the data loader does its own
split by rank and worker (so its position can be checkpointed); the loss gathers features
across ranks itself. The loop calls small objects that each own one concern: the metrics
sink (`run_log`), the checkpointer, the in-loop evaluator, the end-of-step check (`health`: finite
loss and gradients, stop signals from `preemption`). A run lives in `LOGS/NAME/` (see docs/contracts.md).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from vlp.config import Config, ConfigError
from vlp.data.errors import DataError
from vlp import precision as prec
from vlp.models import create_model, export_open_clip, model_identity
from vlp.runtime import checkpoint as ckpt
from vlp.train import device_batch, health
from vlp.train import sharding
from vlp.train.checkpointer import Checkpointer
from vlp.train.collective_faults import PeerFault, timed_out
from vlp.train.console import Console
from vlp.train.feed import StepFeed
from vlp.train.health import TrainingError
from vlp.train.inloop_eval import InLoopEval, open_sets
from vlp.runtime.peers import Peers
from vlp.runtime.preemption import Preempted, StopSignals
from vlp.train.launcher import LauncherWatch
from vlp.train.run_log import MetricsLog, RunPaths, flatten, run_name
from vlp.train.run_state import RunFolder
from vlp.train.step import train_step
from vlp.train.telemetry import Meter
from vlp.train.threads import configure_threads

__all__ = ["TrainingError", "Preempted", "train", "RunPaths", "run_name"]


def make_accelerator(cfg: Config, paths: RunPaths):
    """accelerate's Accelerator for this run's precision and trackers."""
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    from vlp.distributed import parent_argv, single_process_launch_error

    problem = single_process_launch_error(dict(os.environ), parent_argv())
    if problem:
        raise ConfigError(problem)
    precision = prec.accelerate_mixed_precision(run_precision(cfg))
    report_to = None if cfg.run.report_to in (None, "none") else cfg.run.report_to
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps process-wide state; a second run in this process (a sweep, a notebook)
        # may ask for another precision.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True on machines without CUDA: accelerate then sets up multi-process CPU runs (gloo) under torchrun.
    # --dist-timeout: how long a collective may wait (NCCL's default is 10 min); rank-0-only work is waited for
    # apart (vlp.distributed.wait_for_main)
    timeout = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.dist_timeout))] if cfg.run.dist_timeout else []
    return Accelerator(mixed_precision=precision, log_with=report_to, project_dir=str(paths.root),
                       cpu=not torch.cuda.is_available(), kwargs_handlers=timeout)


def run_precision(cfg: Config) -> str:
    """--precision with `auto` resolved for this machine."""
    return prec.resolve(cfg.run.precision, "cuda" if torch.cuda.is_available() else "cpu")


def build_model(cfg: Config):
    """The model bundle as configured: towers, locks, activation checkpointing, loss-specific parameters."""
    from vlp.losses import prepare_model_for_loss

    bundle = create_model(cfg.model.model, pretrained=cfg.model.pretrained, tokenizer=cfg.model.tokenizer,
                          aug_cfg={"scale": tuple(cfg.data.rrc_scale)})
    model = bundle.model
    prepare_model_for_loss(model, cfg.loss, model_cfg=bundle.model_cfg)  # records a SigLIP bias in the config
    if cfg.model.lock_image:
        model.lock_image_tower()
    if cfg.model.lock_text:
        model.lock_text_tower()
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    prec.cast_model(model, run_precision(cfg))  # open_clip's bf16/fp16/pure_*: 16-bit weights, no autocast
    return bundle


def train(cfg: Config, show_final_eval: bool = True) -> dict:
    """Run training as configured; returns the last logged scalars (and eval figures, if any).
    SIGTERM/SIGINT/SIGUSR1 end it after the current step with a checkpoint (raises Preempted).
    show_final_eval=False leaves the final figures to the caller (the demo prints them with chance levels)."""
    paths = RunPaths(Path(cfg.run.logs) / run_name(cfg))
    with StopSignals() as signals, RunFolder(paths.root) as folder:
        launcher = LauncherWatch(signals)   # under torchrun: its agent's death stops the ranks as a signal does
        try:
            return _train(cfg, paths, signals, folder, show_final_eval)
        except Preempted:
            gone = launcher.stopped(paths.checkpoints)
            if gone is None:
                raise
            raise gone from None
        except RuntimeError as e:   # a collective that failed because a rank died or stalled: one line naming it
            lost = folder.peers.lost(e) if folder.peers is not None else None
            stalled = None if lost else timed_out(e, cfg.run.dist_timeout)
            if lost is None and stalled is None:
                raise
            found = ckpt.list_checkpoints(paths.checkpoints)
            last = f"the last checkpoint is {found[-1][1]} (step {found[-1][0]})" if found else "no checkpoint yet"
            raise PeerFault(f"{lost or stalled}; {last}: start the run again with --resume latest",
                            "rank lost" if lost else "collective timeout") from None


def _train(cfg: Config, paths: RunPaths, signals: StopSignals, folder: RunFolder, show_final_eval: bool) -> dict:
    from accelerate.utils import set_seed

    from vlp.data.pipeline import build_train_loader
    from vlp.distributed import reduce_mean, wait_for_main
    from vlp.losses import build_loss, clamp_logit_scale
    from vlp.train.optim import build_optimizer, build_scheduler

    if not cfg.data.train_data:
        raise ConfigError("--train-data is required")
    eval_sets = open_sets(cfg.run.eval_data)          # a bad --eval-data set stops the run before step 1
    accelerator = make_accelerator(cfg, paths)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    refused = folder.hold() if main else None   # one run per folder; every rank learns the answer
    if health.any_rank(refused is not None, accelerator.device):
        raise ConfigError(refused or f"run folder {paths.root} is in use by another training")
    folder.peers = Peers(accelerator)
    console = Console(main, cfg.run.progress)
    threads = configure_threads(cfg.run.threads, cfg.data.workers, accelerator.device,
                                int(os.environ.get("LOCAL_WORLD_SIZE", world)))

    resume_from: Optional[Path] = None
    if cfg.run.resume:
        resume_from = ckpt.resolve_resume(cfg.run.resume, paths.checkpoints, say=console.print)
        if resume_from is None:
            console.print(f"--resume latest: no checkpoint in {paths.checkpoints} yet; starting from step 0")
    elif ckpt.list_checkpoints(paths.checkpoints):
        raise ConfigError(f"run folder {paths.root} already has checkpoints: pass --resume latest or a new --name")
    elif (paths.root / "config.yaml").exists():
        raise ConfigError(f"run folder {paths.root} already holds a run (no checkpoints): pass a new --name, "
                          f"or --resume latest to start it again")
    paths.create()
    set_seed(cfg.run.seed, device_specific=True)

    bundle = build_model(cfg)
    loader = build_train_loader(cfg.data, bundle.preprocess_train, bundle.tokenizer,
                                rank=rank, world_size=world, seed=cfg.run.seed,
                                device_normalize=device_batch.wanted(accelerator.device))
    to_device = device_batch.DeviceBatch(accelerator.device, loader.normalization if loader.device_normalize else None,
                                         prec.compute_dtype(run_precision(cfg)), prec.input_dtype(run_precision(cfg)))
    steps_per_epoch = loader.batches_per_epoch // cfg.optim.accum_freq
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch holds {loader.batches_per_epoch} batches per process, fewer than --accum-freq "
                          f"{cfg.optim.accum_freq}: lower --batch-size or add data")
    total_steps = cfg.optim.max_steps or steps_per_epoch * cfg.optim.epochs

    model = bundle.model
    if cfg.model.fsdp:  # before the optimiser: FSDP2 turns the parameters into DTensors
        model = sharding.shard_model(model, cfg.model.fsdp_sharding, accelerator.device, run_precision(cfg))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    model, optimizer = sharding.prepare(accelerator, model, optimizer, compile=cfg.model.torchcompile)
    # The plain module inside the DDP/compile wrappers (same parameters): what is saved, evaluated, clamped.
    net = sharding.plain_module(accelerator, model)
    loss_fn = build_loss(cfg.loss, rank=rank, world_size=world)
    feed = StepFeed(loader, cfg.optim.accum_freq, to_device)
    checkpointer = Checkpointer(paths.checkpoints, accelerator, net, optimizer, scheduler, feed, cfg,
                                model_identity(bundle, cfg.model.tokenizer), say=console.print)

    step, epoch, loader_state = 0, 0, None
    if resume_from is not None:
        step, epoch, loader_state = checkpointer.restore(resume_from)
        console.print(f"resumed from {resume_from} at step {step}")

    folder.start(step)
    if main:
        (paths.root / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
    if cfg.run.report_to not in (None, "none"):
        accelerator.init_trackers("tensorboard", config=flatten("", cfg.to_dict()))  # -> RUN/tensorboard/
    metrics = MetricsLog(paths.metrics, accelerator, main)
    evaluate_now = InLoopEval(cfg, bundle, accelerator, metrics, eval_sets)

    samples_per_step = cfg.data.batch_size * cfg.optim.accum_freq * world
    meter = Meter.for_model(net, samples_per_step, world, accelerator.device)
    console.begin(cfg, net=net, model_name=bundle.model_name, loader=loader, device=accelerator.device, world=world,
                  precision=run_precision(cfg), threads=threads, steps=(step, steps_per_epoch, total_steps),
                  run_dir=paths.root)
    model.train()
    start_step = step
    last: dict = {}
    t_last, step_last = time.perf_counter(), step
    empty_epochs = 0
    # Without --max-steps the run is --epochs epochs: an epoch cut short (a size file's phantom samples) is not made
    # up by extra epochs.
    while step < total_steps and (cfg.optim.max_steps or epoch < cfg.optim.epochs):
        loader.set_epoch(epoch)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
            loader_state = None
        feed.start()
        step_at_epoch_start = step
        with meter.waiting():
            more = health.all_ranks(feed.fetch(), accelerator.device)
        while more:
            meter.begin()   # the step's clock: its compute, the next step's fetch, the optimiser
            feed.advance()
            losses = train_step(model, feed.current, loss_fn, backward=accelerator.backward,
                                autocast=accelerator.autocast,
                                no_sync=lambda: sharding.gradient_sync_off(accelerator, model))
            norm = health.checked_grad_norm(accelerator, model, cfg.optim.grad_clip_norm)
            with meter.waiting():   # the next step's batches, while the device still works on this one
                more = step + 1 < total_steps and feed.fetch()
            # Every rank must agree, or one would raise while the others wait in a collective.
            verdict = health.agree(losses["loss"], norm, signals.requested, more)
            more = verdict.more
            if verdict.problem:
                optimizer.zero_grad(set_to_none=True)
                saved = checkpointer.save_before_failure(step, epoch)
                raise TrainingError(f"{verdict.problem} at step {step + 1}; {saved}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale(net)
            step += 1
            meter.step()
            console.step(step)
            checkpointer.poll()   # a background save that failed: one line

            if step % cfg.run.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                rate = samples_per_step * (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                last = {f"train/{k}": reduce_mean(v.float()).item() for k, v in losses.items()}
                last.update({
                    "train/logit_scale": sharding.full_value(net.logit_scale).exp().item(),
                    **({"train/logit_bias": sharding.full_value(net.logit_bias).item()}
                       if getattr(net, "logit_bias", None) is not None
                       else {}),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/samples_per_s": rate, "train/epoch": epoch,
                    **{f"data/skipped/{k}": v for k, v in loader.skip_counts().items()},
                    "data/retries": loader.retries(),
                    **meter.report(),
                })
                metrics.log(step, last)
                console.log(step, last)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total_steps:
                last.update(results := evaluate_now(net, step))
                console.eval(step, results)
            if step % cfg.run.save_every == 0 and step < total_steps:
                checkpointer.save(step, epoch, background=True)
            if verdict.stop:
                raise Preempted(f"{signals.name}: stopped after step {step}, state saved in "
                                f"{checkpointer.save(step, epoch)}; continue with --resume latest")
        if health.any_rank(feed.error is not None, accelerator.device):   # the last good state first
            raise DataError(f"{feed.error or 'a data error on another rank'}; the state after step {step} is saved "
                            f"in {checkpointer.save(step, epoch)}")
        # A resumed run may start at the very end of an epoch; two empty epochs in a row mean no data.
        empty_epochs = empty_epochs + 1 if step == step_at_epoch_start else 0
        if empty_epochs >= 2:
            raise TrainingError(f"epoch {epoch} yielded no complete batch: check --train-data and the skip counts")
        if step < total_steps:
            trained = feed.state_dict()["batches_done"] // cfg.optim.accum_freq
            owed = loader.batches_per_epoch // cfg.optim.accum_freq   # (a re-planned epoch's rest: fewer)
            if trained < owed:   # a rank's data ran out early (the loader warned which shard lied)
                console.print(f"warning: epoch {epoch} ended after {trained} of {owed} steps: shards "
                              f"delivered fewer samples than their size files claim (see the skip counts); the run "
                              f"still ends after --epochs")
            epoch += 1
    console.close()

    final = checkpointer.save(step, epoch)
    if health.any_rank(signals.requested, accelerator.device):
        raise Preempted(f"{signals.name}: stopped after the last step, state saved in {final}; "
                        f"--resume latest exports and evaluates it")
    gathered = sharding.full_state(net)[0] if sharding.is_sharded(net) else None  # every rank takes part
    if main:
        import open_clip

        export_open_clip(net, bundle.model_cfg, open_clip.get_model_preprocess_cfg(net), paths.export,
                         tokenizer=cfg.model.tokenizer, state_dict=gathered)
    wait_for_main()  # the export is rank 0's alone: the others wait apart from the collective timeout
    last.update(results := evaluate_now(net, step))
    console.eval(step, results, show=show_final_eval)
    accelerator.end_training()
    console.summary(step=step, samples_seen=(step - start_step) * samples_per_step, last=last,
                    checkpoint=final, export=paths.export, run_dir=paths.root)
    last["run_dir"] = str(paths.root)
    return last
