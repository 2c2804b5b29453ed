"""One typed configuration for a training run.

Sections are dataclasses; every field is also a CLI flag named like open_clip's
(`train_data` -> `--train-data`), so field names are unique across sections.
A YAML file (`--config`) may set fields flat or grouped by section; flags given on the
command line override it. `validate()` is the single place where combinations are checked,
and every failure is one line (ConfigError).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from vlp.config_checks import ConfigError, validate
from vlp.flags import Answer, Parser, check as check_flags
from vlp.open_clip_flags import NOT, OPEN_CLIP_ANSWERS


@dataclass
class DataConfig:
    train_data: Optional[str] = field(default=None, metadata={"help": "shard spec: brace-expanded tar paths, sources joined by '::'"})
    train_data_upsampling_factors: Optional[str] = field(default=None, metadata={"help": "per-source sampling weights joined by '::'"})
    train_num_samples: Optional[int] = field(default=None, metadata={"help": "samples per epoch (default: read from the shards' size files)"})
    dataset_resampled: bool = field(default=False, metadata={"help": "sample shards with replacement (infinite stream)"})
    batch_size: int = field(default=64, metadata={"help": "batch size per process"})
    workers: int = field(default=2, metadata={"help": "data loader worker processes per process"})
    shuffle_buffer: int = field(default=2000, metadata={"help": "sample shuffle buffer size"})
    rrc_scale: tuple[float, float] = field(default=(0.9, 1.0), metadata={"help": "RandomResizedCrop scale range"})
    strong_views: bool = field(default=False, metadata={"help": "Fini et al. strong image augmentation"})
    use_rewrites: bool = field(default=False, metadata={"help": "LaCLIP: draw each sample's text from its caption and rewrites"})
    rewrites_field: str = field(default="rewrites", metadata={"help": "key in each sample's .json that holds its rewrites"})
    text_aug: Optional[str] = field(default=None, metadata={"help": "text augmentation: 'stopwords', 'eda' or 'stopwords+eda'"})
    max_bad_fraction: float = field(default=0.05, metadata={"help": "abort when this fraction of samples is unreadable"})
    strong_rrc_scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={"help": "RandomResizedCrop scale range of strong views"})
    fast_decode: bool = field(default=True, metadata={"help": "vlp's fast decode/crop (reduced-size JPEG decoding); off: apply the model's preprocess as is"})
    shard_retries: int = field(default=3, metadata={"help": "reopen a remote shard this many times after a transport error, then count it unreadable"})
    shard_timeout: float = field(default=60.0, metadata={"help": "seconds a remote shard or size file may send nothing (connect, answer, body) before the read counts as failed and is retried"})


@dataclass
class ModelConfig:
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model name or path to a JSON model config"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "local checkpoint file to start from (no downloads)"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "'hf:DIR' or 'spm:FILE.model'; default: the model's open_clip tokenizer"})
    lock_image: bool = field(default=False, metadata={"help": "freeze the image tower (LiT)"})
    lock_text: bool = field(default=False, metadata={"help": "freeze the text tower"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing in both towers"})
    torchcompile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fsdp: bool = field(default=False, metadata={"help": "FSDP2: shard parameters, gradients and optimiser state over the processes (towers too large to replicate)"})
    allow_model_change: bool = field(default=False, metadata={"help": "--resume with a model config that differs from the checkpoint's (refused otherwise, naming the fields)"})
    fsdp_sharding: str = field(default="full", metadata={"help": "--fsdp: 'full' frees each block's gathered weights after its forward (ZeRO-3), 'grad-op' keeps them for the backward (ZeRO-2)"})
    fsdp_accum_no_sync: bool = field(default=False, metadata={"help": "--fsdp with --accum-freq: reduce-scatter gradients once per step instead of every micro-step, at the cost of every rank holding the whole model's float32 gradients between micro-steps (4 bytes per parameter per rank, as much as DDP)"})


@dataclass
class LossConfig:
    loss: str = field(default="clip", metadata={"help": "base loss: clip, siglip, dcl, infoloob"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the CLIP cross-entropy"})
    local_loss: bool = field(default=False, metadata={"help": "each rank scores only its own rows against all columns"})
    gather_with_grad: bool = field(default=False, metadata={"help": "all-gather features with gradients"})
    loss_chunk_size: int = field(default=4096, metadata={"help": "memory-flat losses (siglip; --local-loss clip/dcl/infoloob): logit columns formed at a time, per-rank memory B x this whatever the number of ranks; 0: hold all gathered logits"})
    uniformity_weight: float = field(default=0.0, metadata={"help": "weight of (unif(I)+unif(T))/2"})
    alignment_weight: float = field(default=0.0, metadata={"help": "weight of the alignment term"})
    cross_uniformity_weight: float = field(default=0.0, metadata={"help": "weight of the cross-modal uniformity term"})
    cyclip_inmodal_weight: float = field(default=0.0, metadata={"help": "CyCLIP in-modal consistency weight"})
    cyclip_crossmodal_weight: float = field(default=0.0, metadata={"help": "CyCLIP cross-modal consistency weight"})


@dataclass
class OptimConfig:
    epochs: int = field(default=1, metadata={"help": "epochs over --train-num-samples"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many optimiser steps (overrides epochs)"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    wd: float = field(default=0.2, metadata={"help": "weight decay (not applied to biases, norms, gains, embeddings, logit scale)"})
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = field(default=1000, metadata={"help": "warmup steps"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "cosine, const, const-cooldown, infinite"})
    lr_cooldown_end: float = field(default=0.0, metadata={"help": "lr at the end of a cooldown"})
    lr_cooldown_power: float = field(default=1.0, metadata={"help": "const-cooldown: power of the polynomial cooldown (1 = linear)"})
    epochs_cooldown: Optional[int] = field(default=None, metadata={"help": "const-cooldown: epochs of cooldown at the end"})
    infinite_constant_lr_frac: float = field(default=0.5, metadata={"help": "infinite schedule: constant lr as a fraction of --lr"})
    infinite_cooldown_steps: int = field(default=0, metadata={"help": "infinite schedule: steps from peak down to the constant"})
    infinite_anneal_steps: int = field(default=0, metadata={"help": "infinite schedule: final anneal steps"})
    accum_freq: int = field(default=1, metadata={"help": "micro-batches per optimiser step (exact for contrastive losses)"})
    grad_clip_norm: Optional[float] = field(default=None, metadata={"help": "clip gradients to this global norm"})


@dataclass
class RunConfig:
    name: Optional[str] = field(default=None, metadata={"help": "run name (folder under --logs)"})
    logs: str = field(default="./logs", metadata={"help": "where run folders are written"})
    seed: int = 0
    precision: str = field(default="auto", metadata={"help": "open_clip's names: amp (fp16 autocast), amp_bf16 (bf16 autocast), "
                                                        "bf16/fp16 (16-bit matmul weights), pure_bf16/pure_fp16, fp32; "
                                                        "auto: amp on CUDA, fp32 on CPU (see vlp/precision.py)"})
    threads: Optional[int] = field(default=None, metadata={"help": "torch intra-op threads per process; auto on CPU: "
                                                                  "cores / processes - loader workers, at least 1",
                                                          "default_text": "auto"})
    dist_timeout: Optional[float] = field(default=None, metadata={"help": "seconds a collective may wait before the job aborts (NCCL: 600 unless set)"})
    save_every: int = field(default=1000, metadata={"help": "checkpoint every N optimiser steps"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep the last K step checkpoints"})
    async_save: bool = field(default=True, metadata={"help": "write the periodic checkpoints in the background (DCP "
                                                             "async_save); --no-async-save: the loop waits for each"})
    resume: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint path"})
    check_every: Optional[int] = field(default=None, metadata={"help": "read the end-of-step check (finite loss and gradients) on the host every N steps instead of every step, so the device is never waited for in between; a non-finite step is then found up to N-1 steps late, and every save reads the pending check first (nothing non-finite is saved). Default: every step off CUDA, --log-every on CUDA", "default_text": "auto"})
    log_every: int = field(default=10, metadata={"help": "log scalars every N steps", "aliases": ["--log-every-n-steps"]})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "eval sets (CLIP_benchmark webdataset roots) for in-loop evaluation"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    report_to: Optional[str] = field(default="tensorboard", metadata={"help": "accelerate tracker, or 'none'"})
    progress: bool = field(default=True, metadata={"help": "progress bar on a terminal (--no-progress or a non-terminal "
                                                           "stderr: one plain line per --log-every steps)"})


SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "run": RunConfig}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of to_dict; also accepts a flat dict. Unknown keys are an error."""
        cfg = cls()
        _apply(cfg, d, source="config")
        return cfg


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index = {}
    for section, klass in SECTIONS.items():
        for f in dataclasses.fields(klass):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


FIELDS = _field_index()


def _resolved_type(section: str, f: dataclasses.Field):
    return typing.get_type_hints(SECTIONS[section])[f.name]


def _coerce(name: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin is tuple:
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            value = tuple(args[0](v) for v in value)
            if len(value) != len(args):
                raise ValueError
            return value
        if origin is list:
            if isinstance(value, str):
                value = [value]
            return [args[0](v) for v in value]
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None


def _apply(cfg: Config, d: dict, source: str) -> None:
    for key, value in d.items():
        if key in SECTIONS and isinstance(value, dict):
            _apply(cfg, {k: v for k, v in value.items()}, source)
            continue
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown option '{key}' in {source}")
        section, f = FIELDS[name]
        setattr(getattr(cfg, section), name, _coerce(name, value, _resolved_type(section, f)))


def _default_text(f: dataclasses.Field) -> str:
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train a CLIP-style dual encoder. Every default is shown; flags "
                                            "are open_clip's where one exists.", allow_abbrev=False)
    p.add_argument("--config", help="YAML file with options (flat or grouped by section); flags override it")
    for section, klass in SECTIONS.items():
        group = p.add_argument_group(section)
        for f in dataclasses.fields(klass):
            tp = _resolved_type(section, f)
            flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
            help_ = f.metadata.get("help", "")
            help_ = f"{help_} (default: {_default_text(f)})" if help_ else f"default: {_default_text(f)}"
            help_ = help_.replace("%", "%%")
            # default=SUPPRESS: only flags the user gave appear in the namespace, so YAML values survive.
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
            if tp is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            elif typing.get_origin(tp) is tuple:
                group.add_argument(*flags, nargs=len(typing.get_args(tp)), **kw)
            elif typing.get_origin(tp) is list:
                group.add_argument(*flags, nargs="+", **kw)
            else:
                group.add_argument(*flags, **kw)
    oc = p.add_argument_group("open_clip flags (exact aliases, or answered with vlp's equivalent; the others "
                                                            "answered 'not supported', with why)")
    oc.add_argument("--siglip", dest="loss", action="store_const", const="siglip", default=argparse.SUPPRESS,
                    help="same as --loss siglip")
    oc.add_argument("--delete-previous-checkpoint", dest="keep_checkpoints", action="store_const", const=1,
                    default=argparse.SUPPRESS, help="same as --keep-checkpoints 1")
    oc.add_argument("--dataset-type", dest="_dataset_type", default=argparse.SUPPRESS, metavar="TYPE",
                    help="only 'webdataset' (vlp reads webdataset shards; data_tools.make_shards writes them)")
    oc.add_argument("--imagenet-val", dest="_imagenet_val", default=argparse.SUPPRESS, metavar="DIR",
                    help="same as adding --eval-data 'DIR?name=imagenet-val&classnames=imagenet&templates=openai'")
    for flag, answer in OPEN_CLIP_ANSWERS.items():   # the unsupported ones answer but stay out of --help
        oc.add_argument(flag, action=Answer, answer=f"open_clip's; in vlp: {answer}", metavar="X",
                        help=argparse.SUPPRESS if answer.startswith(NOT) else f"answered: {answer}".replace("%", "%%"))
    return p


def _open_clip_flags(ns: dict) -> list[str]:
    """Check and remove the open_clip-only flags kept in the namespace; returns eval sets they add."""
    kind = ns.pop("_dataset_type", None)
    if kind is not None and kind not in ("webdataset", "auto"):
        raise ConfigError(f"--dataset-type {kind}: vlp reads webdataset shards only; turn a CSV into shards with "
                          "data_tools.make_shards (vlp data make-shards)")
    imagenet = ns.pop("_imagenet_val", None)
    return [] if imagenet is None else [f"{imagenet}?name=imagenet-val&classnames=imagenet&templates=openai"]


def parse_config(argv: Optional[list[str]] = None) -> Config:
    """CLI flags (+ optional YAML) -> validated Config. Raises ConfigError with one line."""
    # argparse prints usage and exits 2 on unknown flags; one line naming all of them (and open_clip's) instead
    ns = vars(check_flags(build_parser(), argv, ConfigError))
    cfg = Config()
    yaml_path = ns.pop("config", None)
    if yaml_path:
        import yaml

        try:
            with open(yaml_path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {yaml_path}: {e.strerror}") from None
        except yaml.YAMLError as e:   # one line, not the parser's 54
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"config file {yaml_path} is not valid YAML{where}: "
                              f"{getattr(e, 'problem', None) or ' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {yaml_path} must hold a mapping of options")
        _apply(cfg, loaded, source=yaml_path)
    extra_eval = _open_clip_flags(ns)
    _apply(cfg, ns, source="command line")
    cfg.run.eval_data = [*cfg.run.eval_data, *extra_eval]
    validate(cfg)
    return cfg
