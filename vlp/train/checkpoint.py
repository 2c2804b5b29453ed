"""Checkpoints that survive being killed mid-write and restore a run exactly.

A checkpoint is one `torch.save` dict holding only weights_only-safe types (tensors, numbers,
strings, lists, dicts), so loading never executes pickled code. It is written to a temporary
file in the same folder, fsynced, then renamed over its final name: a SIGKILL at any moment
leaves either the old set of checkpoints or the new one, never a truncated file under a real name.
A write that fails (a full disk, a file size limit) removes its temporary file and raises one line
naming the folder and the bytes needed; the checkpoints already there are untouched.

Each checkpoint carries its own SHA-256 in the zip comment that ends every torch.save file
("vlp-sha256:<hex>" over every byte before the zip's end record; `unzip -z` shows it; torch and
open_clip load the file as usual). `load_state` verifies it before unpickling anything, so a
flipped bit is a one-line refusal instead of silently different weights.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vlp.config import ConfigError

STEP_RE = re.compile(r"^step_(\d{8})\.pt$")
LATEST = "latest"
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


def _atomic_write(path: Path, write: Callable[[Any], None], size_hint: int = 0) -> None:
    """`write(file)` into a hidden temporary beside `path`, fsync, rename over `path`, fsync the folder.

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
        os.replace(tmp, path)
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save `obj` atomically to `path`, with its SHA-256 in the zip comment (see the module docstring)."""
    def write(fh) -> None:
        hashing = _Hashing(fh)
        torch.save(obj, hashing)
        hashing.finish()

    _atomic_write(path, write, size_hint=state_bytes(obj))


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
        self.sha.update(data)
        self.fh.write(data)

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


def check(path: Path) -> bool:
    """verify(path), and refuse in one line what torch.load would fail on with a cryptic message: an
    unreadable path, a file that is no torch.save file (a text file), a truncated zip. True: checksum
    verified; False: a readable file without one (another tool's)."""
    try:
        if verify(path):
            return True
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head.startswith(b"PK\x03\x04"):
            zipfile.ZipFile(path).close()  # reads the central directory, which a cut-off file lacks
        elif head[:1] != b"\x80":  # neither torch.save's zip nor its legacy pickle
            raise ConfigError(f"{path} is not a checkpoint: a torch.save file starts with a zip or pickle header, "
                              f"this one with {head!r}")
        return False
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except zipfile.BadZipFile as e:
        raise ConfigError(f"checkpoint {path} is truncated or damaged ({first_line(e)}): "
                          f"use an earlier checkpoint") from None


def on_main(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 of the default process group only (a plain call without one); its result, or its
    ConfigError as one line, on every rank. For reads one rank does for all (verifying a checkpoint)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ConfigError as e:
            box = [("error", str(e))]
        except Exception as e:  # noqa: BLE001 - raised here after the others learn of it
            failure, box = e, [("error", f"rank 0: {type(e).__name__}: {first_line(e)}")]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints in a folder, oldest first (temporary files are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, point `latest` at it, keep only the newest `keep`."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(f"cannot create checkpoint folder {ckpt_dir}: {e.strerror}") from None
    for stale in ckpt_dir.glob(".*.tmp-*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    atomic_torch_save(state, path)
    atomic_write_bytes(ckpt_dir / LATEST, path.name.encode())
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str, ckpt_dir: Path, say: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """`--resume latest` -> the newest checkpoint of this run that verifies (None if there is none yet): a
    damaged newer one is passed over, and `say` gets one line naming both. Else the given file (checked when
    loaded). Under several processes rank 0 alone reads the files and tells the others."""
    if resume == LATEST:
        path, note = on_main(lambda: _newest_intact(ckpt_dir))
        if note and say is not None:
            say(note)
        return path
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume: checkpoint not found: {resume}")
    return path


def _newest_intact(ckpt_dir: Path) -> tuple[Optional[Path], Optional[str]]:
    found = [p for _, p in reversed(list_checkpoints(ckpt_dir))]
    pointer = ckpt_dir / LATEST
    named = ckpt_dir / pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    if named in found:  # the newest written, normally found[0]
        found.remove(named)
        found.insert(0, named)
    damaged = []
    for path in found:
        try:
            check(path)
        except ConfigError as e:
            damaged.append(f"{path.name} {str(e).replace(f'checkpoint {path} ', '').replace(str(path), path.name)}")
            continue
        note = None
        if damaged:
            more = f" (and {len(damaged) - 1} more newer checkpoint(s) damaged)" if len(damaged) > 1 else ""
            note = (f"--resume latest: {damaged[0]}{more}; resuming from {path.name}, the newest checkpoint "
                    f"that verifies")
        return path, note
    if damaged:
        raise ConfigError(f"--resume latest: no checkpoint in {ckpt_dir} verifies: {'; '.join(damaged)}")
    return None, None


def load_state(path: Path, checked: bool = False) -> Any:
    """The one way vlp reads a checkpoint file: check it (its checksum; `checked`: done already, see
    `on_main`), then torch.load it memory-mapped (tensors read from the page cache as they are used, shared
    by the processes of a machine) without executing pickled code (resume, --pretrained and eval all come
    through here)."""
    path = Path(path)
    if not checked:
        check(path)
    try:
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # a legacy (pickle) torch.save file cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing error
        raise ConfigError(f"cannot read checkpoint {path}: {first_line(e)}") from None
