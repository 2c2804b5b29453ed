"""Checkpoints that survive being killed mid-write and restore a run exactly.

A checkpoint is one `torch.save` dict holding only weights_only-safe types (tensors, numbers,
strings, lists, dicts), so loading never executes pickled code. It is written to a temporary
file in the same folder, fsynced, then renamed over its final name: a SIGKILL at any moment
leaves either the old set of checkpoints or the new one, never a truncated file under a real name.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from vlp.config import ConfigError

STEP_RE = re.compile(r"^step_(\d{8})\.pt$")
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """`write(file)` into a hidden temporary beside `path`, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints in a folder, oldest first (temporary files are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, point `latest` at it, keep only the newest `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".*.tmp-*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    atomic_torch_save(state, path)
    atomic_write_bytes(ckpt_dir / LATEST, path.name.encode())
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str, ckpt_dir: Path) -> Optional[Path]:
    """`--resume latest` -> newest complete checkpoint of this run (None if there is none yet); else the given file."""
    if resume == "latest":
        pointer = ckpt_dir / LATEST
        if pointer.is_file():
            named = ckpt_dir / pointer.read_text().strip()
            if named.is_file():
                return named
        found = list_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume: checkpoint not found: {resume}")
    return path


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing error
        raise ConfigError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None


def rng_state() -> dict:
    """Every RNG the training process draws from, in weights_only-safe types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
