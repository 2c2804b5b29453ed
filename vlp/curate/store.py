"""The per-shard embedding table that `vlp data embed` writes and `vlp data filter` reads.

One `NNNNNN.parquet` per input shard (its position in the spec; columns in `vlp.curate.arrow_table`), written
atomically: a shard's file exists only once all of it was embedded, so a killed run resumes at the first shard
without a file, and a damaged file (cut short, overwritten) counts as not written. Folders of the earlier
`NNNNNN.npz` tables (the same arrays, no pickled objects) are still read; `vlp data convert-tables` rewrites
them as Parquet. Per sample: `key`, `caption`, `width`, `height`, `image_hash` (hex blake2b-128 of the image
bytes), `valid` (False: no image or no caption, embeddings zero, score NaN), `image`, `text` (float16,
L2-normalised), `score` (float32 image-text cosine).
`model.json` names the model that wrote the folder; another model's run there is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vlp.curate import arrow_table

MODEL_FILE = "model.json"
PARQUET, LEGACY = ".parquet", ".npz"
DONE_FILE = "done.json"


class CurateError(Exception):
    """Bad curation input; the message is one line."""


def table_path(folder: Path, index: int, suffix: str = PARQUET) -> Path:
    return Path(folder) / f"{index:06d}{suffix}"


def table_files(folder: Path) -> list[Path]:
    """A folder's tables in shard order; where a shard has both, its Parquet table (the newer format)."""
    found: dict[str, Path] = {}
    for suffix in (LEGACY, PARQUET):
        for p in sorted(Path(folder).glob("[0-9]" * 6 + suffix)):
            found[p.stem] = p
    return [found[k] for k in sorted(found)]


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
    if Path(path).suffix == LEGACY:
        atomic_write(path, lambda f: np.savez(f, shard=np.array(shard), **arrays))
    else:
        atomic_write(path, lambda f: arrow_table.write_parquet(f, shard, arrays))


def read_table(path: Path) -> Optional[dict]:
    """A shard's table, or None when the file is missing or damaged (it is then embedded again)."""
    import pyarrow as pa

    try:
        if Path(path).suffix == PARQUET:
            return arrow_table.read_parquet(path)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, pa.ArrowException):
        return None


def table_shard(path: Path) -> Optional[str]:
    """The shard a table was written for, or None when it is missing or damaged; a Parquet table's whole
    data is checked (a file cut short keeps no footer, but one overwritten inside does)."""
    t = read_table(path) if Path(path).is_file() else None
    return None if t is None else str(t["shard"])


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
    order: Optional[np.ndarray] = None   # [N] int64 pool position: table index << 32 | row (both engines' ties)

    def __post_init__(self):
        if self.order is None:
            self.order = np.arange(len(self.key), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.key)


def order_key(table_index, row) -> np.ndarray:
    """A sample's place in the pool as one int64: which shard table, then which row in it."""
    return (np.asarray(table_index, dtype=np.int64) << 32) | np.asarray(row, dtype=np.int64)


def complete_tables(folder: str) -> list[Path]:
    """The shard tables of a finished embed folder (`done.json` written by the last rank), in shard order."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise CurateError(f"{folder} is not a `vlp data embed` output (no {MODEL_FILE})")
    files = table_files(folder)
    if not (folder / DONE_FILE).is_file():
        raise CurateError(f"{folder} is incomplete ({len(files)} shard tables, no {DONE_FILE}): "
                          f"run `vlp data embed` again with the same arguments to finish it")
    return files


def load_tables(folder: str) -> Table:
    """All shard tables of an embed folder, concatenated in one process's memory."""
    folder = Path(folder)
    files = complete_tables(folder)
    parts = [read_table(p) for p in files]
    bad = [p.name for p, t in zip(files, parts) if t is None]
    if bad:
        raise CurateError(f"{folder}: unreadable shard table {bad[0]}; run `vlp data embed` again")
    cols = {}
    for name in ("key", "caption", "width", "height", "image_hash", "valid", "image", "text", "score"):
        cols[name] = np.concatenate([t[name] for t in parts])
    cols["order"] = np.concatenate([order_key(int(p.stem), np.arange(len(t["key"]))) for p, t in zip(files, parts)]) \
        if parts else np.zeros(0, np.int64)
    cols["shard"] = np.concatenate([np.full(len(t["key"]), str(t["shard"]), dtype=object) for t in parts]) \
        if parts else np.array([], dtype=object)
    return Table(**cols)
