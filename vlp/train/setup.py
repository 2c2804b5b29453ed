"""What a run is made of before its first step: accelerate's Accelerator, the resolved precision, the model as
configured, and the checks that a run folder may be used (one run per folder, resume or a fresh name)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from vlp import precision as prec
from vlp.config import Config, ConfigError
from vlp.models import create_model
from vlp.runtime import checkpoint as ckpt
from vlp.train.run_log import RunPaths


def make_accelerator(cfg: Config, paths: RunPaths):
    """accelerate's Accelerator for this run's precision and trackers."""
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    from vlp.distributed import init_restarted_group, parent_argv, single_process_launch_error

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
    init_restarted_group(timeout[0].timeout if timeout else None)   # torchrun --max-restarts: this attempt's keys
    return Accelerator(mixed_precision=precision, log_with=report_to, project_dir=str(paths.root),
                       cpu=not torch.cuda.is_available(), kwargs_handlers=timeout)


def run_precision(cfg: Config) -> str:
    """--precision with `auto` resolved for this machine (and --fsdp): the run's one precision policy."""
    return prec.resolve(cfg.run.precision, "cuda" if torch.cuda.is_available() else "cpu", fsdp=cfg.model.fsdp)


def build_model(cfg: Config):
    """The model bundle as configured: towers, locks, activation checkpointing, loss-specific parameters (weights
    stay float32 here: `vlp.train.parallelize` casts them)."""
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
    return bundle


def resume_point(cfg: Config, paths: RunPaths, say: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint to resume from (None: a fresh start); ConfigError when the folder already holds a run that
    this command would overwrite."""
    if cfg.run.resume:
        found = ckpt.resolve_resume(cfg.run.resume, paths.checkpoints, say=say)
        if found is None:
            say(f"--resume latest: no checkpoint in {paths.checkpoints} yet; starting from step 0")
        return found
    if ckpt.list_checkpoints(paths.checkpoints):
        raise ConfigError(f"run folder {paths.root} already has checkpoints: pass --resume latest or a new --name")
    if (paths.root / "config.yaml").exists():
        raise ConfigError(f"run folder {paths.root} already holds a run (no checkpoints): pass a new --name, "
                          f"or --resume latest to start it again")
    return None
