"""The random number generators of one training process, saved with a checkpoint and restored exactly.

Each rank has its own streams (torch, Python, NumPy and, on a GPU, its own device's); a checkpoint holds
one entry per rank and each rank takes its own back. Only weights_only-safe types are stored.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """Every RNG the training process draws from, in weights_only-safe types. On a GPU, only this process's
    own device (the one it trains on): a resume may see fewer or other GPUs (8 under torchrun, 1 under SLURM)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state.get("cuda") is not None and torch.cuda.is_available():
        own = state["cuda"]
        if isinstance(own, (list, tuple)):  # older checkpoints: every GPU the saving process saw
            index = torch.cuda.current_device()
            own = own[index] if index < len(own) else None
        if own is not None:
            torch.cuda.set_rng_state(own)


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
