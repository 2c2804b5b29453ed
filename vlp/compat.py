"""Feature checks across the dependency range vlp supports (setup.cfg's floors up to the newest release).

vlp installs into the torch a cluster already has, so code that needs something newer than the floor asks
whether the function or argument exists here, never compares version strings (site builds carry suffixes
like `2.11.0a0+git...` or `+cu130`, and backports exist). Each `has_*` answers that question; each
`require_*` returns the feature or raises `ConfigError` with one line naming the torch release that has it.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Callable, Optional, Sequence

import torch

from vlp.config import ConfigError

# Where FSDP2's fully_shard lives: public since torch 2.6, under _composable since 2.4.
FSDP2_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")


def _needs(feature: str, release: str, what: Optional[str]) -> ConfigError:
    who = f"{what} needs " if what else "needs "
    return ConfigError(f"{who}{feature}, which this torch {torch.__version__} lacks: install torch >= {release}")


def fully_shard() -> Optional[Callable]:
    """FSDP2's `fully_shard`, or None where this torch has no FSDP2 (or no torch.distributed)."""
    for name in FSDP2_MODULES:
        try:
            fn = getattr(importlib.import_module(name), "fully_shard", None)
        except Exception:  # noqa: BLE001 - ImportError, or a build without distributed support
            continue
        if callable(fn):
            return fn
    return None


def fsdp2_mixed_precision() -> Optional[type]:
    """FSDP2's `MixedPrecisionPolicy` (beside `fully_shard`), or None."""
    for name in FSDP2_MODULES:
        try:
            cls = getattr(importlib.import_module(name), "MixedPrecisionPolicy", None)
        except Exception:  # noqa: BLE001 - as in fully_shard()
            continue
        if cls is not None:
            return cls
    return None


def has_fsdp2() -> bool:
    return fully_shard() is not None


def require_fsdp2(what: Optional[str] = "--fsdp") -> Callable:
    fn = fully_shard()
    if fn is None:
        raise _needs("FSDP2 (fully_shard)", "2.4", what)
    return fn


def flop_counter() -> Optional[type]:
    """`torch.utils.flop_counter.FlopCounterMode`, or None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    return FlopCounterMode


def has_flop_counter() -> bool:
    return flop_counter() is not None


def require_flop_counter(what: Optional[str] = "MFU") -> type:
    cls = flop_counter()
    if cls is None:
        raise _needs("torch.utils.flop_counter.FlopCounterMode", "2.1", what)
    return cls


def has_load_weights_only() -> bool:
    """Whether `torch.load` takes `weights_only=` (loading checkpoints without running pickled code)."""
    try:
        return "weights_only" in inspect.signature(torch.load).parameters
    except (TypeError, ValueError):
        return False


def require_load_weights_only(what: Optional[str] = "loading a checkpoint safely") -> None:
    if not has_load_weights_only():
        raise _needs("torch.load(weights_only=...)", "1.13", what)


def has_torch_amp() -> bool:
    """Whether `torch.amp` has the device-generic `autocast` and `GradScaler` (torch.cuda.amp's successors)."""
    amp = getattr(torch, "amp", None)
    return amp is not None and hasattr(amp, "autocast") and hasattr(amp, "GradScaler")


def require_torch_amp(what: Optional[str] = "mixed precision") -> None:
    if not has_torch_amp():
        raise _needs("torch.amp.autocast and torch.amp.GradScaler", "2.3", what)


def total_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the tensors' norms: `torch.nn.utils.get_total_norm` (fused, torch >= 2.6), else per tensor."""
    fn = getattr(torch.nn.utils, "get_total_norm", None)
    if fn is not None:
        return fn(tensors, norm_type)
    norms = [torch.linalg.vector_norm(t, norm_type) for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)


def has_module(name: str) -> bool:
    """Whether an optional package is importable, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_module(name: str, extra: str, what: str) -> None:
    """One line naming the extra that brings an optional package (`pip install 'vlp[hf]'`)."""
    if not has_module(name):
        raise ConfigError(f"{what} needs the {name} package: pip install 'vlp[{extra}]' (or pip install {name})")
