"""AdamW with open_clip's weight-decay exclusions, and the learning-rate schedules.

Weight decay is *not* applied to (`no_decay_reason` gives the rule that fired):
  * every parameter with fewer than 2 dimensions (biases, norm gains, class embedding, logit scale/bias),
  * anything named `*bias`, `logit_scale`, `logit_bias`,
  * parameters of normalisation layers (LayerNorm/GroupNorm/BatchNorm/RMSNorm...), whatever their shape,
  * embeddings: `nn.Embedding` weights (the text token embedding; Hugging Face word/position
    embeddings) and parameters named as a positional/class/token embedding (`positional_embedding`,
    `class_embedding`, `token_embedding`, timm's `pos_embed`, `cls_token`, `reg_token`, ...).
open_clip_train excludes `ndim < 2 or "bn"/"ln" in name or "bias" in name or "logit_scale" in name`;
on open_clip models everything it excludes is excluded here too (its "bn"/"ln" substring rule only
ever hits 1-D tensors there). Going beyond it: the token embedding and the 2-D positional embeddings,
which, like the class embedding it already spares, are lookup tables rather than linear maps.
The convolutional patch embedding (`visual.conv1`) and projections stay decayed.
Frozen parameters (requires_grad False, e.g. a locked tower) are left out of the optimiser.

Schedules (`build_scheduler`) are LambdaLR multipliers of `--lr`, evaluated at k = number of
optimiser steps already taken (call `scheduler.step()` after each `optimizer.step()`), with
open_clip's warmup convention: lr(k) = lr * (k + 1) / warmup for k < warmup, so step `warmup - 1`
runs at the peak. `total_steps` is where the schedule reaches its end value (never used for a step). A warmup
longer than the run makes a cosine/const run all warmup (as in open_clip); const-cooldown and
infinite phases that do not fit are a ConfigError.
  cosine          warmup, then lr * (1 + cos(pi * (k - warmup) / (total - warmup))) / 2
  const           warmup, then lr
  const-cooldown  warmup, lr, then over the last `epochs_cooldown * steps_per_epoch` steps
                  (1 - e/E)^power * (lr - lr_cooldown_end) + lr_cooldown_end  (open_clip's const-cooldown)
  infinite        warmup; cosine from lr to `infinite_constant_lr_frac * lr` over `infinite_cooldown_steps`;
                  constant; linear to 0 over the last `infinite_anneal_steps` steps (none if 0).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch

from vlp.config import ConfigError, OptimConfig

_NORM_TYPES: tuple[type, ...] = (
    torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
    torch.nn.modules.batchnorm._NormBase,
) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())

_EMBEDDING_NAME = re.compile(
    r"(^|\.)(positional_embedding|class_embedding|token_embedding|pos_embed|cls_token|cls_emb|reg_token|"
    r"dist_token|mask_token)(\.|$)")


def no_decay_reason(name: str, param: torch.Tensor, module: Optional[torch.nn.Module] = None) -> Optional[str]:
    """Why `param` gets no weight decay, or None if it does. `module` is the module owning it."""
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim < 2:
        return "1-d"
    if leaf.endswith("bias") or leaf in ("logit_scale", "logit_bias"):
        return "bias/scale"
    if module is not None and isinstance(module, _NORM_TYPES):
        return "norm"
    if module is not None and isinstance(module, torch.nn.Embedding):
        return "embedding"
    if _EMBEDDING_NAME.search(name):
        return "embedding"
    return None


def split_decay(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(names of decayed parameters, names of parameters without decay); trainable ones only, each once."""
    owners = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # yields a shared parameter once
        if p.requires_grad:
            (no_decay if no_decay_reason(name, p, owners.get(name)) else decay).append(name)
    return decay, no_decay


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """[{"params": decayed, "weight_decay": wd}, {"params": the rest, "weight_decay": 0.0}] (see module doc).

    Each trainable parameter is in exactly one group; empty groups are dropped."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": wd},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.wd)
    if not groups:
        raise ConfigError("the model has no trainable parameters (both towers locked?)")
    # The fused kernel (CPU and CUDA) updates each tensor in one pass without temporaries: the token
    # embedding's update dominated the tiny model's step otherwise.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


# ----------------------------------------------------------------------------- schedules

def _warmup(k: int, warmup: int) -> float:
    return (k + 1) / warmup


def lr_multiplier(cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule as a function of the step index k, as a fraction of `cfg.lr`. Raises ConfigError
    (one line) when the phases do not fit into `total_steps`."""
    warmup = max(int(cfg.warmup), 0)
    total = int(total_steps)
    if total < 1:
        raise ConfigError(f"the run has {total} optimiser steps: nothing to schedule")
    kind = cfg.lr_scheduler

    if kind == "cosine":
        # A warmup as long as the run (a smoke test with --max-steps 2) is all warmup, as in open_clip.
        def f(k: int) -> float:
            if k < warmup:
                return _warmup(k, warmup)
            return 0.5 * (1 + math.cos(math.pi * min(k - warmup, total - warmup) / max(total - warmup, 1)))
        return f

    if kind == "const":
        return lambda k: _warmup(k, warmup) if k < warmup else 1.0

    if kind == "const-cooldown":
        if not cfg.epochs_cooldown:
            raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown")
        cooldown = int(cfg.epochs_cooldown) * int(steps_per_epoch)
        start = total - cooldown
        if cooldown < 1 or start < warmup:
            raise ConfigError(f"--epochs-cooldown {cfg.epochs_cooldown} ({cooldown} steps) does not fit after "
                              f"--warmup {warmup} in the run's {total} steps")
        end = cfg.lr_cooldown_end / cfg.lr if cfg.lr else 0.0
        power = cfg.lr_cooldown_power

        def f(k: int) -> float:
            if k < warmup:
                return _warmup(k, warmup)
            if k < start:
                return 1.0
            e = min(k - start, cooldown)
            return (1 - e / cooldown) ** power * (1 - end) + end
        return f

    if kind == "infinite":
        frac = cfg.infinite_constant_lr_frac
        cool = int(cfg.infinite_cooldown_steps)
        anneal = int(cfg.infinite_anneal_steps)
        anneal_start = total - anneal
        if anneal_start < warmup + cool:
            raise ConfigError(f"infinite schedule: --warmup {warmup} + --infinite-cooldown-steps {cool} + "
                              f"--infinite-anneal-steps {anneal} exceed the run's {total} steps")

        def f(k: int) -> float:
            if k < warmup:
                return _warmup(k, warmup)
            if anneal and k >= anneal_start:
                return frac * max(0.0, 1 - (k - anneal_start) / anneal)
            if k < warmup + cool:
                return frac + (1 - frac) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / cool))
            return frac
        return f

    raise ConfigError(f"--lr-scheduler must be cosine, const, const-cooldown or infinite (got {kind!r})")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_multiplier` (each group's lr is `cfg.lr` times the multiplier). Sets the
    first step's lr at once; call `scheduler.step()` after every `optimizer.step()`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, steps_per_epoch))


def aim_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, multiplier: Callable[[int], float]) -> None:
    """Give a (restored) LambdaLR a new multiplier: the lr of the next step is at once `multiplier` at the steps
    already taken (`last_epoch`), as if the scheduler had been built with it."""
    scheduler.lr_lambdas = [multiplier] * len(scheduler.optimizer.param_groups)
    scheduler._last_lr = [base * multiplier(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
