"""The files of a torch.distributed.checkpoint (DCP) folder: hashed as they are written, listed in a manifest,
verified before use, and read back without a process group.

Each rank's DCP writer hashes the bytes it writes (`HashingWriter`: SHA-256 beside the write, as vlp's
torch.save files are), so no process reads the folder again to hash it; the main process lists every file with
its digest and size in `manifest.json`, whose own digest the checkpoint's main file records. `verify_folder`
checks all of it (a flipped byte anywhere is a one-line refusal). `read_entries` reads chosen entries of a
folder into plain tensors in one process (consolidating the model for open_clip, reading every rank's loader
position on resume).
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

from vlp.config import ConfigError
from vlp.runtime.atomic_file import _hash_alongside, atomic_write_bytes, first_line

MANIFEST = "manifest.json"
METADATA = ".metadata"


def _filesystem_writer():
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class _HashingFileSystem(FileSystem):
        """DCP's local file system, whose write streams hash what passes through them."""

        def __init__(self) -> None:
            super().__init__()
            self.digests: dict = {}
            self.error: Optional[OSError] = None   # the first failed write (torch.save's zip writer hides errno)
            self.error_file: Optional[str] = None

        @contextmanager
        def create_stream(self, path, mode):
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                hashing = _HashingStream(stream)
                try:
                    yield hashing
                except BaseException:
                    if self.error is None and hashing.error is not None:
                        self.error, self.error_file = hashing.error, Path(path).name
                    raise
                name = Path(path).name
                self.digests[name.removesuffix(".tmp")] = (hashing.sha.hexdigest(), hashing.size)

    class HashingWriter(FileSystemWriter):
        """FileSystemWriter whose `digests` are {file name: (sha256, bytes)} of what this rank wrote."""

        def __init__(self, path) -> None:
            super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True)
            self.fs = _HashingFileSystem()

        @property
        def digests(self) -> dict:
            return dict(self.fs.digests)

    return HashingWriter


def hashing_writer(path: Path):
    """A DCP storage writer for `path` that records the SHA-256 of every file it writes (`.digests`)."""
    return _filesystem_writer()(path)


class _HashingStream(io.RawIOBase):
    """A write stream that hashes its bytes on the way (tell/flush/fileno go to the file underneath)."""

    def __init__(self, fh) -> None:
        super().__init__()
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            _hash_alongside(self.sha, view, self.fh.write)
        except OSError as e:
            self.error = self.error or e
            raise
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.fh.tell()

    def flush(self) -> None:
        self.fh.flush()

    def fileno(self) -> int:
        return self.fh.fileno()

    def close(self) -> None:  # the file underneath is closed by DCP's own context manager
        pass


def write_manifest(folder: Path, digests: dict) -> str:
    """`manifest.json` listing {file: sha256, bytes} (every rank's writes merged); returns the manifest's own
    SHA-256, which the checkpoint's main file records."""
    files = {name: {"sha256": sha, "bytes": size} for name, (sha, size) in sorted(digests.items())}
    if METADATA not in files:
        raise ConfigError(f"{folder}: DCP wrote no {METADATA} file")
    data = (json.dumps({"files": files}, indent=1) + "\n").encode()
    atomic_write_bytes(folder / MANIFEST, data)
    return hashlib.sha256(data).hexdigest()


def verify_folder(folder: Path, manifest_sha: str, who: str) -> None:
    """Check every file the manifest lists against its size and SHA-256; ConfigError, one line, naming `who`
    (the checkpoint) and the first file that differs."""
    try:
        data = (folder / MANIFEST).read_bytes()
    except OSError as e:
        raise ConfigError(f"checkpoint {who} is incomplete: {folder.name}/{MANIFEST}: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != manifest_sha:
        raise ConfigError(f"checkpoint {who} is corrupt: {folder.name}/{MANIFEST} changed since it was written")
    for name, entry in json.loads(data)["files"].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ConfigError(f"checkpoint {who} is incomplete: {folder.name}/{name}: {e.strerror}") from None
        if size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise ConfigError(f"checkpoint {who} is corrupt: the SHA-256 of {folder.name}/{name} does not match the "
                              f"one written with it (bytes changed on disk); use an earlier checkpoint")


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def entries(folder: Path) -> dict:
    """{key: (shape, dtype)} of the tensors a DCP folder holds (from its .metadata; verify the folder first:
    the metadata is a pickle)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        with open(folder / METADATA, "rb") as fh:
            meta = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise ConfigError(f"cannot read {folder}/{METADATA}: {first_line(e)}") from None
    return {k: (tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def read_entries(folder: Path, keep: Callable[[str], bool], held: Optional[dict] = None) -> dict:
    """The entries of `folder` whose key passes `keep`, as plain CPU tensors, read in this process alone (no
    process group). `held`: entries() already read."""
    import torch.distributed.checkpoint as dcp

    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in (held or entries(folder)).items() if keep(k)}
    if out:
        dcp.load(out, checkpoint_id=str(folder), no_dist=True)
    return out


def as_bytes_tensor(obj) -> torch.Tensor:
    """`obj` (weights_only-safe types) as a uint8 tensor: DCP stores it as a tensor, so loading it executes no
    pickled code (`from_bytes_tensor`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def from_bytes_tensor(t: torch.Tensor):
    return torch.load(io.BytesIO(t.numpy().tobytes()), map_location="cpu", weights_only=True)


def failure_line(e: BaseException) -> str:
    """One line from a DCP CheckpointException (which rank, its first line) or any other exception."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, (exc, _) = sorted(failures.items())[0]
        return f"rank {rank}: {first_line(exc)}"
    return first_line(e)
