"""The checks `validate()` makes once, before any work starts: each option's range and the combinations that cannot
work, every failure one line (ConfigError). Kept apart from the dataclasses and the parser in `vlp.config`, which
re-exports both names."""
from __future__ import annotations

import dataclasses
import os


class ConfigError(ValueError):
    """A bad option or combination of options; its message is one line for the user."""


def validate(cfg):
    """Check combinations once, before any work starts; -> the same Config."""
    _check_finite(cfg)
    _check_batch_and_loss(cfg)
    _check_optim(cfg)
    _check_precision_and_data(cfg)
    _check_run(cfg)
    return cfg


def _check_batch_and_loss(cfg) -> None:
    d, lo = cfg.data, cfg.loss
    if d.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if d.workers < 0:
        raise ConfigError("--workers must be 0 or more")
    if lo.local_loss and not lo.gather_with_grad:
        raise ConfigError("--local-loss needs --gather-with-grad: without it the gradients are biased")
    if lo.loss not in ("clip", "siglip", "dcl", "infoloob"):
        raise ConfigError(f"--loss must be one of clip, siglip, dcl, infoloob (got {lo.loss!r})")
    if cfg.model.fsdp_sharding not in ("full", "grad-op"):
        raise ConfigError(f"--fsdp-sharding must be full or grad-op (got {cfg.model.fsdp_sharding!r})")
    if lo.loss_chunk_size < 0:
        raise ConfigError("--loss-chunk-size must be 0 (gathered logits) or more")
    if lo.loss != "clip" and lo.label_smoothing:
        raise ConfigError("--label-smoothing applies to the clip loss only")
    if not 0 <= lo.label_smoothing < 1:
        raise ConfigError("--label-smoothing must be in [0, 1)")
    for name in ("uniformity", "alignment", "cross_uniformity", "cyclip_inmodal", "cyclip_crossmodal"):
        if getattr(lo, f"{name}_weight") < 0:
            raise ConfigError(f"--{name.replace('_', '-')}-weight must be 0 or more")

def _check_optim(cfg) -> None:
    o = cfg.optim
    if o.accum_freq < 1:
        raise ConfigError("--accum-freq must be at least 1")
    if o.lr_scheduler not in ("cosine", "const", "const-cooldown", "infinite"):
        raise ConfigError(f"--lr-scheduler must be cosine, const, const-cooldown or infinite (got {o.lr_scheduler!r})")
    if o.lr_scheduler == "const-cooldown" and not o.epochs_cooldown:
        raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown")
    if o.lr <= 0:
        raise ConfigError("--lr must be positive")
    if o.warmup < 0:
        raise ConfigError("--warmup must be 0 or more")
    if o.lr_cooldown_power <= 0:
        raise ConfigError("--lr-cooldown-power must be positive")
    if o.epochs_cooldown is not None and o.epochs_cooldown < 0:
        raise ConfigError("--epochs-cooldown must be 0 or more")
    if not 0 <= o.infinite_constant_lr_frac <= 1:
        raise ConfigError("--infinite-constant-lr-frac must be between 0 and 1")
    if o.infinite_cooldown_steps < 0 or o.infinite_anneal_steps < 0:
        raise ConfigError("--infinite-cooldown-steps and --infinite-anneal-steps must be 0 or more")

def _check_precision_and_data(cfg) -> None:
    d, r = cfg.data, cfg.run
    from vlp.precision import NAMES as PRECISIONS

    if r.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)} (got {r.precision!r})")
    from vlp.precision import fsdp_refusal

    if cfg.model.fsdp and fsdp_refusal(r.precision):
        raise ConfigError(fsdp_refusal(r.precision))
    if r.check_every is not None and r.check_every < 1:
        raise ConfigError("--check-every must be at least 1")
    if r.threads is not None and r.threads < 1:
        raise ConfigError("--threads must be at least 1")
    if d.text_aug not in (None, "stopwords", "eda", "stopwords+eda"):
        raise ConfigError(f"--text-aug must be stopwords, eda or stopwords+eda (got {d.text_aug!r})")
    for flag, (lo_, hi) in (("--rrc-scale", d.rrc_scale), ("--strong-rrc-scale", d.strong_rrc_scale)):
        if not (0 < lo_ <= hi <= 1):
            raise ConfigError(f"{flag} must satisfy 0 < min <= max <= 1 (got {lo_} {hi})")
    if d.shuffle_buffer < 0:
        raise ConfigError("--shuffle-buffer must be 0 or more")
    if d.train_num_samples is not None and d.train_num_samples < 1:
        raise ConfigError("--train-num-samples must be at least 1")
    if d.train_data_upsampling_factors and d.train_data and \
            len(d.train_data_upsampling_factors.split("::")) != len(d.train_data.split("::")):
        raise ConfigError("--train-data-upsampling-factors needs one value per '::'-joined source of --train-data")
    if not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError("--max-bad-fraction must be between 0 and 1")
    if d.shard_retries < 0:
        raise ConfigError("--shard-retries must be 0 or more")
    if not d.shard_timeout > 0:
        raise ConfigError("--shard-timeout must be more than 0 seconds")

def _check_run(cfg) -> None:
    o, r = cfg.optim, cfg.run
    if r.name is not None and (os.path.isabs(r.name) or os.path.normpath(r.name).split(os.sep)[0] in ("..", ".")):
        raise ConfigError(f"--name {r.name!r} must name a folder inside --logs (not an absolute path, not '..')")
    if r.keep_checkpoints < 1:
        raise ConfigError("--keep-checkpoints must be at least 1")
    if o.grad_clip_norm is not None and o.grad_clip_norm <= 0:
        raise ConfigError("--grad-clip-norm must be positive (leave it unset for no clipping)")
    if o.wd < 0 or o.eps <= 0 or not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ConfigError("need --wd >= 0, --eps > 0 and --beta1, --beta2 in [0, 1)")
    if o.lr_cooldown_end < 0:
        raise ConfigError("--lr-cooldown-end must be 0 or more")
    for flag, value, least in (("--epochs", o.epochs, 1), ("--max-steps", o.max_steps, 1),
                               ("--save-every", r.save_every, 1), ("--log-every", r.log_every, 1),
                               ("--eval-every", r.eval_every, 0), ("--seed", r.seed, 0), ("--dist-timeout", r.dist_timeout, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least} (got {value})")


def _check_finite(cfg) -> None:
    """No float option may be NaN or infinite: every comparison with NaN is False, so range checks miss it."""
    import math

    for section in (f.name for f in dataclasses.fields(cfg)):
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number (got {value})")
