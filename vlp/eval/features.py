"""Image features of an eval split cached on disk (float16), for the linear probe and k-NN.

A cache file is keyed by the model's weights, the set's files, the split and the transform, so a probe
with another strength, k, or few-shot draw reuses the encoded features, and a changed checkpoint, set or
transform never does. Files are written atomically (a crash leaves no half file behind).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import torch

CACHE_ENV = "VLP_FEATURE_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlp" / "features")


def model_fingerprint(model) -> str:
    """A digest of every parameter and buffer (names, shapes, bytes): equal weights, equal digest."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model_id: str, set_fingerprint, split: str, preprocess: Callable) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((model_id, set_fingerprint, split, repr(preprocess))).encode())
    return h.hexdigest()


def load(cache_dir: Path, key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    path = Path(cache_dir) / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return d["features"].float(), d["targets"].long()
    except Exception:  # noqa: BLE001 - a damaged cache file is re-computed, never fatal
        return None


def save(cache_dir: Path, key: str, features: torch.Tensor, targets: torch.Tensor, meta: dict) -> Path:
    from vlp.runtime.checkpoint import atomic_torch_save

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.pt"
    atomic_torch_save({"features": features.half(), "targets": targets.long(), "meta": meta}, path)
    return path
