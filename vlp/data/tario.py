"""Minimal, strict tar reading and writing for webdataset shards: `read_shard` is the one sample reader of vlp
(training loader, eval's webdataset sets, data tools, benchmarks).

Reading is done with a small header parser instead of `tarfile` so that
  * the same code reads local files and streams (pipes, HTTP, object stores: `vlp.data.streams`),
  * samples before a start index are skipped without being decoded (on a local file by seeking, unread),
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

from vlp.data.captions import decode_caption, read_meta, read_rewrites
from vlp.data.images import image_ext
from vlp.data.errors import Absent
from vlp.data.streams import Stream, backoff, local_path, open_stream

BLOCK = 512
_ZERO = b"\0" * BLOCK


class TarError(Exception):
    """A shard could not be read to its end. `next_index`: samples [0, next_index) were complete."""

    def __init__(self, kind: str, path: str, next_index: int, detail: str = ""):
        super().__init__(f"{path}: {kind} after {next_index} samples{': ' + detail if detail else ''}")
        self.kind = kind  # "truncated" | "bad_header" | "missing" | "unreadable" (transport errors after retries)
        self.path = path
        self.next_index = next_index
        self.detail = detail


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


class _Bytes:
    """Sequential reading of one location: a local file skips by seeking, a stream by reading and dropping."""

    def __init__(self, url: str, timeout: Optional[float] = None):
        path = local_path(url)
        self.stream: Optional[Stream] = None
        if path is not None:
            self.f = open(path, "rb")
            self.size: Optional[int] = os.fstat(self.f.fileno()).st_size
        else:
            self.stream = open_stream(url, timeout)
            self.size = None
        self.pos = 0
        self.seekable = self.stream is None

    def read(self, n: int) -> bytes:
        data = self.f.read(n) if self.stream is None else self.stream.read(n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Move `n` bytes on; False when the data ends first."""
        if n <= 0:
            return True
        if self.stream is None:
            if self.pos + n > self.size:
                self.pos = self.size
                return False
            self.pos += n
            self.f.seek(self.pos)
            return True
        while n:
            b = self.stream.read(min(n, 1 << 20))
            if not b:
                return False
            n -= len(b)
            self.pos += len(b)
        return True

    def close(self) -> None:
        if self.stream is None:
            self.f.close()
        else:
            self.stream.close()


def iter_members(src: _Bytes, path: str = "?") -> Iterator[tuple[str, int, int]]:
    """Yield (name, size, data_offset) for each regular file, the source positioned at its data; the caller
    reads the data or not (what it leaves is skipped before the next header).
    Raises TarError(kind='truncated'|'bad_header', next_index=-1) (index filled in by callers)."""
    long_name: Optional[str] = None
    pax: dict[str, str] = {}
    nxt = 0
    while True:
        if not src.skip(nxt - src.pos):
            raise TarError("truncated", path, -1, "member data cut off")
        pos = src.pos
        hdr = src.read(BLOCK)
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
        nxt = data_off + (size + BLOCK - 1) // BLOCK * BLOCK
        if typ in (b"x", b"L", b"g"):
            data = src.read(size)
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
            nxt = data_off + (size + BLOCK - 1) // BLOCK * BLOCK
        long_name, pax = None, {}
        if typ in (b"0", b"\0", b"7"):
            yield name, size, data_off


class Sample:
    """One sample of a shard: its members' bytes by extension (only those asked for), and where it is.

    `spans` holds (offset, size) instead of bytes for the extensions a caller asked to read later
    (`read_shard(..., spans=...)`, local files only)."""

    __slots__ = ("index", "key", "files", "shard", "spans")

    def __init__(self, index: int, key: str, files: dict[str, bytes], shard: str,
                 spans: Optional[dict[str, tuple[int, int]]] = None):
        self.index, self.key, self.files, self.shard, self.spans = index, key, files, shard, spans or {}

    @property
    def image_ext(self) -> Optional[str]:
        """The extension of the sample's image by the one rule (`vlp.data.images.IMAGE_EXTS` order)."""
        return image_ext(list(self.files) + list(self.spans))

    @property
    def image(self) -> Optional[bytes]:
        ext = self.image_ext
        return None if ext is None else self.files.get(ext)

    def caption(self) -> str:
        """The original caption (`.txt`, else the json's `caption`); SkipSample when missing/empty/not UTF-8."""
        return decode_caption(self.files)

    def rewrites(self, field: str = "rewrites") -> list[str]:
        return read_rewrites(self.files, field)

    def meta(self) -> dict:
        """The parsed `.json` member ({} when absent or unreadable)."""
        return read_meta(self.files)


class ShardReader:
    """Samples `start <= index < stop` of one shard, in tar order: THE way vlp reads a shard.

    Members of skipped samples and extensions not in `exts` (None: all) are never decoded, and on a local file
    never read (seeked over). A transport error (connection dropped or refused, HTTP 503, no byte for `timeout`
    seconds, command failed) reopens the shard and skips to the first sample not yet delivered, up to `retries`
    times (waiting 0.2, 0.4, ... s, at most 5 s; `retried` counts them), then raises TarError('missing' when the
    location said it holds nothing and no byte of it ever arrived, else 'unreadable'). Data errors (truncation,
    a corrupt header) raise TarError at once. `next_index` of a TarError: samples [start, next_index) were
    delivered. After a clean end `count` is the number of samples the shard holds (when stopped at `stop`: `stop`).
    """

    def __init__(self, url: str, start: int = 0, stop: Optional[int] = None,
                 exts: Optional[Iterable[str]] = None, retries: int = 0, spans: Iterable[str] = (),
                 timeout: Optional[float] = None):
        self.url, self.start, self.stop, self.retries = url, start, stop, max(0, int(retries))
        self.timeout = timeout
        self.retried = 0
        self.exts = None if exts is None else set(exts)
        self.spans = set(spans)
        self.count: Optional[int] = None

    def __iter__(self) -> Iterator[Sample]:
        nxt, attempt, got_bytes = self.start, 0, False
        while True:
            try:
                src = _Bytes(self.url, self.timeout)
            except OSError as e:
                if local_path(self.url) is not None:
                    raise TarError("missing", self.url, nxt, e.strerror or str(e)) from None
                err = e
            else:
                try:
                    for s in self._samples(src, nxt):
                        nxt = s.index + 1
                        yield s
                    return
                except OSError as e:
                    err = e
                finally:
                    got_bytes = got_bytes or src.pos > 0 or (src.stream is not None and src.stream.received > 0)
                    src.close()
            if attempt >= self.retries:
                kind = "missing" if isinstance(err, Absent) and not got_bytes else "unreadable"
                detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                if attempt:
                    detail += f" ({attempt + 1} tries)"
                raise TarError(kind, self.url, nxt, detail)
            attempt += 1
            self.retried += 1
            time.sleep(backoff(attempt))

    def _samples(self, src: _Bytes, start: int) -> Iterator[Sample]:
        stop, want, lazy = self.stop, self.exts, self.spans if src.seekable else set()
        index, key, files, spans = -1, None, {}, {}
        try:
            for name, size, off in iter_members(src, self.url):
                k, ext = split_key(name)
                if k is None:
                    continue
                if k != key or ext in files or ext in spans:
                    if key is not None and index >= start:
                        yield Sample(index, key, files, self.url, spans)
                    index += 1
                    key, files, spans = k, {}, {}
                    if stop is not None and index >= stop:
                        self.count = stop
                        return
                if src.size is not None and off + size > src.size:
                    raise TarError("truncated", self.url, -1, "member data cut off")
                if index >= start and (want is None or ext in want or ext in self.spans):
                    if ext in lazy:
                        spans[ext] = (off, size)
                    else:
                        data = src.read(size)
                        if len(data) < size:
                            raise TarError("truncated", self.url, -1, "member data cut off")
                        files[ext] = data
        except TarError as e:
            # the sample in progress is incomplete: everything before `index` was delivered
            raise TarError(e.kind, self.url, max(index, start), e.detail) from None
        if key is not None and index >= start and (stop is None or index < stop):
            yield Sample(index, key, files, self.url, spans)
        self.count = index + 1 if stop is None else min(index + 1, stop)


def read_shard(url: str, start: int = 0, stop: Optional[int] = None, exts: Optional[Iterable[str]] = None,
               retries: int = 0, spans: Iterable[str] = (), timeout: Optional[float] = None) -> ShardReader:
    """Iterate the `Sample`s of one shard (see `ShardReader`); `timeout`: seconds without a byte before a remote
    read counts as stalled (None: `vlp.data.streams.DEFAULT_TIMEOUT`)."""
    return ShardReader(url, start, stop, exts, retries, spans, timeout)


def count_samples(url: str, retries: int = 0, timeout: Optional[float] = None) -> int:
    """Number of complete samples in a shard (reads headers only; a stream is read through). Raises TarError."""
    r = read_shard(url, exts=(), retries=retries, timeout=timeout)
    for _ in r:
        pass
    return int(r.count or 0)


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
