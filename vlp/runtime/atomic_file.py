"""Files that survive being killed mid-write and prove their own integrity.

A file is written to a temporary file in the same folder, fsynced, then renamed over its final name: a
SIGKILL at any moment leaves either the old file or the new one, never a truncated file under a real name.
A write that fails (a full disk, a file size limit) removes its temporary file and raises one line naming
the folder and the bytes needed.

A torch.save file written here carries its own SHA-256 in the zip comment that ends every torch.save file
("vlp-sha256:<hex>" over every byte before the zip's end record; `unzip -z` shows it; torch and open_clip
load the file as usual), hashed while the bytes are written (in a second thread, so hashing and writing
overlap). `verify` checks it before anything is unpickled, once per file and process.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vlp.config import ConfigError

CHECKSUM_TAG = b"vlp-sha256:"
_EOCD = b"PK\x05\x06"  # the zip "end of central directory" record: 22 bytes + comment, last in the file
_EOCD_SIZE = 22
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (disk full, no permission); one line, nothing half-written left."""


def first_line(e: BaseException, index: int = 0, limit: int = 200) -> str:
    """Line `index` of an exception's message (or its first, or its type name): never raises."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    line = lines[index] if len(lines) > index else (lines[0] if lines else type(e).__name__)
    return line[:limit]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Recording:
    """A write-only file wrapper that keeps the first OSError (torch's zip writer hides its errno)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _atomic_write(path: Path, write: Callable[[Any], None], size_hint: int = 0,
                  ready: Optional[Callable[[], Optional[str]]] = None) -> None:
    """`write(file)` into a hidden temporary beside `path`, fsync, rename over `path`, fsync the folder.
    `ready()`, called just before the rename, may veto it with a one-line reason (files that must exist first).

    On failure the temporary file is removed and CheckpointWriteError says why in one line."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fh = out = None
    try:
        fh = open(tmp, "wb")
        out = _Recording(fh)
        write(out)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        vetoed = ready() if ready is not None else None
        if vetoed:
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(vetoed)
        os.replace(tmp, path)
    except CheckpointWriteError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure: clean up, then one line
        cause = (out.error if out is not None else None) or (e if isinstance(e, OSError) else None)
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass  # the same full disk again; the file goes next
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(path, cause or e, size_hint)) from None
    _fsync_dir(path.parent)


def _write_failure(path: Path, cause: BaseException, size_hint: int,
                   removed: str = "the partial file was removed") -> str:
    folder = path.parent
    where = f"cannot write {path.name} in {folder}"
    if not isinstance(cause, OSError):  # safetensors reports the OS error inside its own message
        found = re.search(r"(?:Os \{ code: |os error )(\d+)", str(cause))
        cause = OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else cause
    if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
        try:
            free = f"{shutil.disk_usage(folder).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        needed = f"about {size_hint:,} bytes needed" if size_hint else "size unknown"
        return f"{where}: {cause.strerror} ({needed}, {free}); {removed} and earlier checkpoints are intact"
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(cause)
    return f"{where}: {reason}"


def folder_write_error(folder: Path, cause: BaseException, size_hint: int) -> CheckpointWriteError:
    """The one-line error for a folder (an export) whose writing failed; the caller removes the partial copy."""
    return CheckpointWriteError(_write_failure(folder, cause, size_hint, removed="the partial folder was removed"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data), size_hint=len(data))


def atomic_torch_save(obj: Any, path: Path, ready: Optional[Callable[[], Optional[str]]] = None) -> str:
    """torch.save `obj` atomically to `path`, with its SHA-256 in the zip comment (see the module docstring);
    returns the digest. `ready`: as for `_atomic_write`."""
    hashing = None

    def write(fh) -> None:
        nonlocal hashing
        hashing = _Hashing(fh)
        torch.save(obj, hashing)
        hashing.finish()

    _atomic_write(path, write, size_hint=state_bytes(obj), ready=ready)
    return hashing.sha.hexdigest()


_HASHER: list = []  # one thread that hashes a chunk while the caller's thread writes it


def _hash_alongside(sha, data, write: Callable[[Any], Any]) -> None:
    """sha.update(data) and write(data) at the same time: both release the GIL for large buffers, so the
    SHA-256 costs no time on top of the write where a second core is free."""
    if len(data) < (1 << 20):
        sha.update(data)
        write(data)
        return
    if not _HASHER:
        from concurrent.futures import ThreadPoolExecutor

        _HASHER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlp-sha256"))
    hashed = _HASHER[0].submit(sha.update, data)
    try:
        write(data)
    finally:
        hashed.result()  # `data` is torch.save's buffer: in use until this call returns


class _Hashing:
    """Passes torch.save's bytes on and hashes them, holding back the last 22 (the zip end record), then
    writes that record with the digest as its comment."""

    def __init__(self, fh):
        self.fh, self.sha, self.tail = fh, hashlib.sha256(), b""

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= _EOCD_SIZE:
            self._out(self.tail)
            self._out(view[:-_EOCD_SIZE])
            self.tail = bytes(view[-_EOCD_SIZE:])
        else:
            both = self.tail + bytes(view)
            self._out(both[:-_EOCD_SIZE])
            self.tail = both[-_EOCD_SIZE:]
        return len(view)

    def _out(self, data) -> None:
        _hash_alongside(self.sha, data, self.fh.write)

    def flush(self) -> None:
        self.fh.flush()

    def finish(self) -> None:
        if not (self.tail.startswith(_EOCD) and self.tail[-2:] == b"\0\0"):
            raise RuntimeError("torch.save did not end with a plain zip end record")
        comment = CHECKSUM_TAG + self.sha.hexdigest().encode()
        self.fh.write(self.tail[:-2] + struct.pack("<H", len(comment)) + comment)


def state_bytes(obj: Any) -> int:
    """About what torch.save will write for `obj`: its tensors' bytes (each storage once) plus a little."""
    seen: dict = {}

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            x = x.to_local() if hasattr(x, "to_local") else x   # a DTensor: the shard this process holds
            st = x.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return sum(seen.values()) + 64 * 1024


def stored_checksum(path: Path) -> tuple[Optional[str], int]:
    """(hex digest recorded in the file or None, number of bytes it covers)."""
    size = path.stat().st_size
    comment_len = len(CHECKSUM_TAG) + 64
    if size < _EOCD_SIZE + comment_len:
        return None, 0
    with open(path, "rb") as fh:
        fh.seek(size - _EOCD_SIZE - comment_len)
        end = fh.read()
    record, comment = end[:_EOCD_SIZE], end[_EOCD_SIZE:]
    if not (record.startswith(_EOCD) and comment.startswith(CHECKSUM_TAG)
            and struct.unpack("<H", record[-2:])[0] == comment_len):
        return None, 0
    return comment[len(CHECKSUM_TAG):].decode("ascii", "replace"), size - _EOCD_SIZE - comment_len


def verify(path: Path) -> bool:
    """Check a checkpoint's recorded SHA-256 (True), or report that it has none (False: another tool's
    file, or an older vlp one); raise ConfigError, one line, when the bytes changed since it was written."""
    path = Path(path)
    st = path.stat()
    if st.st_size == 0:
        raise ConfigError(f"checkpoint {path} is empty (0 bytes): it was never completely written")
    seen = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if seen in _VERIFIED:  # this process read every byte of this very file already
        return True
    digest, covered = stored_checksum(path)
    if digest is None:
        return False
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        left = covered
        while left:
            chunk = fh.read(min(left, 8 << 20))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest() != digest:
        raise ConfigError(f"checkpoint {path} is corrupt: its SHA-256 does not match the one written with it "
                          f"(bytes changed on disk); use an earlier checkpoint")
    _VERIFIED.add(seen)
    return True


_VERIFIED: set = set()  # (path, inode, size, mtime) of files verify() hashed: once per file and process
