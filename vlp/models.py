"""Build dual encoders through open_clip, and read and write checkpoints it can load.

A model is named as in open_clip (`ViT-B-32`), or given as a path to a JSON tower config
(the same schema as open_clip's `model_configs/*.json`, registered under the file's stem),
or as `local-dir:PATH` (an exported vlp/open_clip folder).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch

from vlp.config import ConfigError

# vlp's own small architectures (`vlp-tiny`, for CPU runs) are known to open_clip by name.
open_clip.add_model_config(Path(__file__).parent / "model_configs")

EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"
EXPORT_HF_TOWER = "hf_text_tower"   # an HF text tower's config.json inside an export folder


@dataclass
class ModelBundle:
    """Everything needed to train or score a dual encoder."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str
    model_cfg: dict


def resolve_model_name(model: str) -> str:
    """Turn `--model` into an open_clip name, registering a JSON config file if one is given."""
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model config file not found: {model}")
        open_clip.add_model_config(path)
        return path.stem
    if model.startswith("local-dir:"):
        if not (Path(model[len("local-dir:"):]) / EXPORT_CONFIG).is_file():
            raise ConfigError(f"{model}: no {EXPORT_CONFIG} in that folder")
        return model
    if open_clip.get_model_config(model) is None:
        raise ConfigError(f"unknown model '{model}' (not an open_clip model name nor a .json config)")
    return model


def build_tokenizer(spec: Optional[str], model_name: str, context_length: Optional[int] = None):
    """open_clip's tokenizer for the model, or `hf:DIR` (local Hugging Face tokenizer), or `spm:FILE`."""
    if not spec:
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    kind, _, arg = spec.partition(":")
    if kind == "hf":
        if not Path(arg).is_dir():
            raise ConfigError(f"tokenizer folder not found: {arg}")
        from vlp.compat import require_module

        require_module("transformers", "hf", "--tokenizer hf:DIR")
        return open_clip.tokenizer.HFTokenizer(arg, context_length=context_length or 77)
    if kind == "spm":
        from vlp.tokenizers import SentencePieceTokenizer

        if not Path(arg).is_file():
            raise ConfigError(f"sentencepiece model not found: {arg}")
        return SentencePieceTokenizer(arg, context_length=context_length or 77)
    raise ConfigError(f"--tokenizer must be 'hf:DIR' or 'spm:FILE' (got {spec!r})")


def create_model(
    model: str,
    pretrained: Optional[str] = None,
    tokenizer: Optional[str] = None,
    aug_cfg: Optional[dict] = None,
    device: str | torch.device = "cpu",
) -> ModelBundle:
    """Build a model with random weights (or weights from a local file) plus its transforms and tokenizer."""
    name = resolve_model_name(model)
    if pretrained and Path(pretrained).is_dir() and (Path(pretrained) / EXPORT_WEIGHTS).is_file():
        pretrained = str(Path(pretrained) / EXPORT_WEIGHTS)  # an export folder: its weights
    if pretrained and not Path(pretrained).is_file():
        raise ConfigError(f"--pretrained file not found: {pretrained}")
    model_cfg = _model_cfg(name)
    # A Hugging Face text tower must come from a local folder (nothing is downloaded); its weights
    # are loaded from there unless the config says `hf_model_pretrained: false`.
    text_cfg = model_cfg.get("text_cfg", {})
    overrides = {}
    if name.startswith("local-dir:") and (moved := _moved_export_tower(Path(name[len("local-dir:"):]), text_cfg)):
        text_cfg = model_cfg["text_cfg"] = overrides["text_cfg"] = moved
    hf_dir = text_cfg.get("hf_model_name")
    if hf_dir and not Path(hf_dir).is_dir():
        raise ConfigError(f"Hugging Face text tower '{hf_dir}' must be a local folder (vlp downloads nothing)")
    with _quiet_root_logger():  # open_clip warns that no pretrained weights were named: vlp loads its own
        net, pre_train, pre_val = open_clip.create_model_and_transforms(
            name, device=device, aug_cfg=aug_cfg, output_dict=True,
            pretrained_text=bool(hf_dir) and text_cfg.get("hf_model_pretrained", True), **overrides)
    if pretrained:
        load_weights(net, pretrained, model_cfg)
    ctx = model_cfg.get("text_cfg", {}).get("context_length")
    tok = build_tokenizer(tokenizer, name, context_length=ctx)
    if tokenizer and tokenizer.startswith("spm:"):
        from vlp.tokenizers import check_model_cfg

        problem = check_model_cfg(model_cfg, tok)  # else the text tower pools at the wrong position
        if problem:
            raise ConfigError(f"model '{name}' does not fit tokenizer {tokenizer}: {problem} "
                              "(data_tools.train_tokenizer writes a matching config)")
    return ModelBundle(net, pre_train, pre_val, tok, name, model_cfg)


def _moved_export_tower(export: Path, text_cfg: dict) -> Optional[dict]:
    """The text_cfg of an export folder that was moved after it was written: its HF tower's recorded (absolute)
    config folder is gone, the copy inside the folder is used. None when nothing needs changing."""
    recorded = text_cfg.get("hf_model_name")
    inside = export / EXPORT_HF_TOWER
    if not recorded or Path(recorded).is_dir() or not (inside / "config.json").is_file():
        return None
    return {**text_cfg, "hf_model_name": str(inside), "hf_model_pretrained": False}


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _model_cfg(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown model '{name}'")
    return cfg


def load_weights(model: torch.nn.Module, path: str, model_cfg: Optional[dict] = None) -> None:
    """Load a state dict from a vlp checkpoint, an open_clip checkpoint, or safetensors; one clear error on mismatch.

    Weights trained with a SigLIP bias load into an architecture built without one: the `logit_bias`
    parameter is added (and `init_logit_bias` recorded in `model_cfg`, so checkpoints rebuild it)."""
    state = read_state_dict(path)
    if "logit_bias" in state and getattr(model, "logit_bias", None) is None and hasattr(model, "logit_scale"):
        from vlp.losses import SIGLIP_INIT_BIAS

        model.logit_bias = torch.nn.Parameter(torch.zeros_like(state["logit_bias"].float()))
        if model_cfg is not None:
            model_cfg["init_logit_bias"] = SIGLIP_INIT_BIAS
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ConfigError(f"{path} does not fit this architecture: {detail[:200]}") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Model weights from any checkpoint layout vlp meets, loaded without executing pickled code."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - an empty or damaged file is a user-facing error
            from vlp.runtime.checkpoint import first_line

            raise ConfigError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    from vlp.runtime.checkpoint import load_state

    ckpt = load_state(Path(path), parts=False)  # weights only; checksum verified; one line on any unreadable file
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt:
        raise ConfigError(f"{path} holds no model weights")
    if next(iter(ckpt)).startswith("module."):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


def load_checkpoint(path: str, model_name: Optional[str] = None, tokenizer: Optional[str] = None,
                    device: str | torch.device = "cpu") -> ModelBundle:
    """A scoring-ready bundle from a vlp checkpoint (knows its model), an export folder, or an open_clip file + name."""
    p = Path(path)
    if p.is_dir():
        return create_model(f"local-dir:{p}", tokenizer=tokenizer, device=device)
    if not p.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    meta = read_checkpoint_meta(path)
    if model_name is None:
        if meta is None:
            raise ConfigError(f"{path} is not a vlp checkpoint: give the model name (e.g. --model ViT-B-32)")
        model_name = _register_cfg(meta["model_name"], meta["model_cfg"])
        tokenizer = tokenizer or meta.get("tokenizer")
    bundle = create_model(model_name, pretrained=path, tokenizer=tokenizer, device=device)
    bundle.model.eval()
    return bundle


def read_checkpoint_meta(path: str) -> Optional[dict]:
    """The model identity (and training step) stored in a vlp checkpoint, or None for other files (and folders)."""
    if not Path(path).is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001
        from vlp.runtime.checkpoint import check

        check(Path(path))  # a damaged checkpoint or a text file is reported as such, not as "not a vlp checkpoint"
        return None
    if isinstance(ckpt, dict) and "model_cfg" in ckpt and "model_name" in ckpt:
        step = ckpt.get("step")
        return {"model_name": ckpt["model_name"], "model_cfg": json.loads(ckpt["model_cfg"]),
                "tokenizer": ckpt.get("tokenizer"), "precision": ckpt.get("precision"),
                "step": int(step) if isinstance(step, (int, float)) or hasattr(step, "item") else None}
    return None


def _register_cfg(name: str, cfg: dict) -> str:
    """Make a checkpoint's own architecture known to open_clip under its name (no file needed)."""
    if name.startswith("local-dir:"):
        return name
    known = open_clip.get_model_config(name)
    if known is not None and known == cfg:
        return name
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = cfg  # same registry add_model_config fills
    return name


def model_identity(bundle: ModelBundle, tokenizer_spec: Optional[str]) -> dict[str, Any]:
    """What a checkpoint stores so that it can rebuild its own model (JSON strings only: weights_only-safe)."""
    return {"model_name": bundle.model_name, "model_cfg": json.dumps(bundle.model_cfg), "tokenizer": tokenizer_spec}


def export_open_clip(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, out_dir: str | os.PathLike,
                     tokenizer: Optional[str] = None, state_dict: Optional[dict] = None) -> Path:
    """Write a self-contained folder open_clip loads with `create_model_and_transforms('local-dir:DIR')` and
    `get_tokenizer('local-dir:DIR')`, or with `create_model_and_transforms(name, pretrained=DIR/open_clip_model.safetensors)`
    for a registered name. A `--tokenizer` (spm:FILE or hf:DIR) is written into the folder as Hugging Face
    tokenizer files, referred to relatively. An HF text tower's config.json is copied in too (see
    `_export_hf_tower`). `state_dict`: the weights to write instead of `model.state_dict()` (a sharded model's
    gathered state)."""
    import shutil

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from vlp.tokenizers import save_tokenizer_files
    from vlp.runtime.checkpoint import folder_write_error, state_bytes

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / EXPORT_WEIGHTS))
        umask_mode(tmp / EXPORT_WEIGHTS)
        cfg = json.loads(json.dumps(model_cfg))
        text_cfg = cfg.get("text_cfg", {})
        cfg["text_cfg"] = {**text_cfg, **save_tokenizer_files(tokenizer, text_cfg, tmp),
                           **_export_hf_tower(model, text_cfg, tmp, out)}
        (tmp / EXPORT_CONFIG).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:  # a full disk: one line, no half-written folder left
        shutil.rmtree(tmp, ignore_errors=True)
        raise folder_write_error(out, e, state_bytes(state)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file the mode every other written file gets (0644 under umask 022): safetensors writes its
    files 0600, so another user of a shared export folder could not read the weights."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _export_hf_tower(model: torch.nn.Module, text_cfg: dict, tmp: Path, out: Path) -> dict:
    """Copy an HF text tower's config.json into the export and point `hf_model_name` at that copy.

    open_clip builds the tower with `AutoConfig.from_pretrained(hf_model_name)`, which reads a relative path
    against the working directory, not the `local-dir:` folder; so the entry is the copy's absolute path as
    the export is written (the weights are in the safetensors: `hf_model_pretrained: false`). It holds while
    the export stays where it was written, from any working directory and without the source folder; vlp's
    own loaders also find the copy in an export that was moved."""
    if not text_cfg.get("hf_model_name"):
        return {}
    tower = getattr(getattr(model, "module", model), "text", None)
    config = getattr(tower, "config", None)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(text_cfg["hf_model_name"])
    config.save_pretrained(str(tmp / EXPORT_HF_TOWER))
    return {"hf_model_name": str(out.resolve() / EXPORT_HF_TOWER), "hf_model_pretrained": False}
