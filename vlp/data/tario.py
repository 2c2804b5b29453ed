"""Minimal, strict tar reading and writing for webdataset shards.

Reading is done with a small header parser instead of `tarfile` so that
  * samples before a start index are skipped by seeking, without reading their bytes,
  * only the members a consumer wants are read,
  * a truncated or corrupt archive is reported (with how far it got) instead of silently ending.

A *sample* is a maximal run of consecutive members sharing a key (webdataset's rule: the key is
the path up to the first dot of the file name, the extension the rest, lower-cased).
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from typing import Iterable, Iterator, Optional

BLOCK = 512
_ZERO = b"\0" * BLOCK


class TarError(Exception):
    """A shard could not be read to its end. `next_index`: samples [0, next_index) were complete."""

    def __init__(self, kind: str, path: str, next_index: int, detail: str = ""):
        super().__init__(f"{path}: {kind} after {next_index} samples{': ' + detail if detail else ''}")
        self.kind = kind  # "truncated" | "bad_header" | "missing"
        self.path = path
        self.next_index = next_index


def split_key(name: str) -> tuple[Optional[str], str]:
    """'dir/000001.seg.jpg' -> ('dir/000001', 'seg.jpg'); names without an extension -> (None, '')."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, ""
    return name[:dot], name[dot + 1:].lower()


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        n = 0
        for c in field[1:]:
            n = (n << 8) | c
        return n
    field = field.strip(b"\0 ")
    return int(field, 8) if field else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.find(b" ", i)
        if sp < 0:
            break
        length = int(data[i:sp])
        rec = data[sp + 1:i + length - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        i += length
    return out


def iter_members(f, path: str = "?") -> Iterator[tuple[str, int, int]]:
    """Yield (name, size, data_offset) for each regular file; the caller reads or skips the data
    (the file position is moved past the data before the next header is read).
    Raises TarError(kind='truncated'|'bad_header', next_index=-1) (index filled in by callers)."""
    long_name: Optional[str] = None
    pax: dict[str, str] = {}
    pos = f.tell()
    while True:
        f.seek(pos)
        hdr = f.read(BLOCK)
        if len(hdr) == 0:
            # no end-of-archive marker: the writer never finished
            raise TarError("truncated", path, -1, "no end-of-archive marker")
        if len(hdr) < BLOCK:
            raise TarError("truncated", path, -1, "short header")
        if hdr == _ZERO:
            return
        try:  # random bytes usually fail the octal parse before the checksum comparison
            chk = _octal(hdr[148:156])
            size = _octal(hdr[124:136])
        except ValueError:
            raise TarError("bad_header", path, -1, f"unreadable header at byte {pos}") from None
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarError("bad_header", path, -1, f"checksum mismatch at byte {pos}")
        typ = hdr[156:157]
        data_off = pos + BLOCK
        pos = data_off + (size + BLOCK - 1) // BLOCK * BLOCK
        if typ in (b"x", b"L", b"g"):
            f.seek(data_off)
            data = f.read(size)
            if len(data) < size:
                raise TarError("truncated", path, -1, "short extended header")
            if typ == b"x":
                pax = _pax_records(data)
            elif typ == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = prefix + "/" + name
        if "size" in pax:
            size = int(pax["size"])
            pos = data_off + (size + BLOCK - 1) // BLOCK * BLOCK
        long_name, pax = None, {}
        if typ in (b"0", b"\0", b"7"):
            yield name, size, data_off


def iter_samples(path: str, start: int = 0, stop: Optional[int] = None,
                 exts: Optional[Iterable[str]] = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (index, key, {ext: bytes}) for samples start <= index < stop of one shard.

    Members of skipped samples and extensions not in `exts` (None: all) are never read.
    Raises TarError with `next_index` = the first sample index not delivered complete.
    """
    want = None if exts is None else set(exts)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TarError("missing", path, start, e.strerror or str(e)) from None
    with f:
        fsize = os.fstat(f.fileno()).st_size
        index, key, files = -1, None, {}
        try:
            for name, size, off in iter_members(f, path):
                k, ext = split_key(name)
                if k is None:
                    continue
                if k != key or ext in files:
                    if key is not None and index >= start:
                        yield index, key, files
                    index += 1
                    key, files = k, {}
                    if stop is not None and index >= stop:
                        return
                if off + size > fsize:
                    raise TarError("truncated", path, -1, "member data cut off")
                if index >= start and (want is None or ext in want):
                    f.seek(off)
                    files[ext] = f.read(size)
        except TarError as e:
            # the sample in progress is incomplete: everything before `index` was delivered
            raise TarError(e.kind, path, max(index, start), str(e).split(": ", 1)[-1]) from None
        if key is not None and index >= start and (stop is None or index < stop):
            yield index, key, files


def count_samples(path: str) -> int:
    """Number of complete samples in a shard (reads headers only). Raises TarError."""
    n = 0
    for n_, _, _ in iter_samples(path, exts=()):
        n = n_ + 1
    return n


class ShardWriter:
    """Write samples into `pattern % shard_index` tars of at most `maxcount` samples each.

    Deterministic archives (fixed mtime/owner), so identical input gives identical shards.
    `sizes` maps each shard's file name to its sample count (open_clip's sizes.json format).
    """

    def __init__(self, pattern: str, maxcount: int, start_index: int = 0):
        self.pattern, self.maxcount = pattern, maxcount
        self.index = start_index
        self.tar: Optional[tarfile.TarFile] = None
        self.count = 0
        self.sizes: dict[str, int] = {}
        self.paths: list[str] = []
        self.mtime = time.time() if os.environ.get("VLP_TAR_MTIME_NOW") else 0

    def _open(self) -> None:
        path = self.pattern % self.index if "%" in self.pattern else self.pattern
        self.index += 1
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
        self.paths.append(path)
        self.sizes[os.path.basename(path)] = 0
        self.count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self.tar is None or self.count >= self.maxcount:
            self.close_shard()
            self._open()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = 0o444
            info.uname = info.gname = "vlp"
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.sizes[os.path.basename(self.paths[-1])] = self.count

    def close_shard(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def close(self) -> None:
        self.close_shard()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
