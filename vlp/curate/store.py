"""The per-shard embedding table that `vlp data embed` writes and `vlp data filter` reads.

One `NNNNNN.npz` per input shard (its position in the spec), written atomically: a shard's file exists
only once all of it was embedded, so a killed run resumes at the first shard without a file. Arrays (no
pickled objects): `shard` (its URL, one value), `key`, `caption` (str), `width`, `height` (int32, from the
image header), `image_hash` (16-byte blake2b of the image bytes), `valid` (False: no image or no caption,
embeddings zero, score NaN), `image`, `text` (float16, L2-normalised), `score` (float32 image-text cosine).
`model.json` names the model that wrote the folder; another model's run there is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

MODEL_FILE = "model.json"
DONE_FILE = "done.json"


class CurateError(Exception):
    """Bad curation input; the message is one line."""


def table_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:06d}.npz"


def atomic_write(path: Path, write) -> None:
    """`write(file object)` into a hidden file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(path: Path, shard: str, arrays: dict) -> None:
    atomic_write(path, lambda f: np.savez(f, shard=np.array(shard), **arrays))


def read_table(path: Path) -> Optional[dict]:
    """A shard's table, or None when the file is missing or damaged (it is then embedded again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def check_model(folder: Path, identity: dict) -> None:
    """Record which model writes `folder`; refuse a folder another model (other weights) wrote."""
    path = Path(folder) / MODEL_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != identity["fingerprint"]:
            raise CurateError(f"{folder} holds embeddings of another model ({old.get('model')}, weights "
                              f"{str(old.get('fingerprint'))[:12]}); use another --out or delete it")
        return
    atomic_write(path, lambda f: f.write(json.dumps(identity, indent=1).encode()))


@dataclass
class Table:
    """Every embedded sample of a folder, concatenated in spec order."""

    shard: np.ndarray       # [N] str
    key: np.ndarray         # [N] str
    caption: np.ndarray     # [N] str
    width: np.ndarray
    height: np.ndarray
    image_hash: np.ndarray  # [N] bytes16
    valid: np.ndarray       # [N] bool
    image: np.ndarray       # [N, D] float16
    text: np.ndarray        # [N, D] float16
    score: np.ndarray       # [N] float32

    def __len__(self) -> int:
        return len(self.key)


def load_tables(folder: str) -> Table:
    """All shard tables of an embed folder (it must be complete: `done.json` written by the last rank)."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise CurateError(f"{folder} is not a `vlp data embed` output (no {MODEL_FILE})")
    files = sorted(folder.glob("[0-9]" * 6 + ".npz"))
    if not (folder / DONE_FILE).is_file():
        raise CurateError(f"{folder} is incomplete ({len(files)} shard tables, no {DONE_FILE}): "
                          f"run `vlp data embed` again with the same arguments to finish it")
    parts = [read_table(p) for p in files]
    bad = [p.name for p, t in zip(files, parts) if t is None]
    if bad:
        raise CurateError(f"{folder}: unreadable shard table {bad[0]}; run `vlp data embed` again")
    cols = {}
    for name in ("key", "caption", "width", "height", "image_hash", "valid", "image", "text", "score"):
        cols[name] = np.concatenate([t[name] for t in parts])
    cols["shard"] = np.concatenate([np.full(len(t["key"]), str(t["shard"]), dtype=object) for t in parts]) \
        if parts else np.array([], dtype=object)
    return Table(**cols)
