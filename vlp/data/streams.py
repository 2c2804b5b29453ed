"""Where shard bytes come from: a local file (seekable) or a stream (`pipe:CMD`, `http(s)://`, any fsspec URL).

`http(s)://` is read with urllib, `pipe:` with a shell, `s3://`, `gs://` and every other `scheme://` by fsspec
(an optional dependency: `pip install fsspec` plus the filesystem's package, e.g. `s3fs`, `gcsfs`); every wait is
bounded by `--shard-timeout` (`vlp.data.transports`). Nothing retries inside a transport: `read_small` and
`vlp.data.tario.read_shard` retry, `--shard-retries` times, and count what they did.
"""
from __future__ import annotations

import os
import re
import time
from typing import Callable, Optional
from urllib.parse import urlparse

from vlp.data import transports
from vlp.data.errors import Absent

DEFAULT_TIMEOUT = 60.0   # seconds without a byte before a remote read counts as stalled (--shard-timeout)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(url: str) -> bool:
    """True for anything read as a stream (no seeking, no listing)."""
    return url.startswith("pipe:") or bool(_URL.match(url)) and not url.startswith("file:")


def local_path(url: str) -> Optional[str]:
    """The file behind `url` when it is local (a path or a file: URL), else None."""
    if url.startswith("file:"):
        return urlparse(url).path
    return None if is_remote(url) else url


class Stream:
    """A readable byte stream over a transport (`vlp.data.transports`), its failures raised as OSError.

    `received` counts the bytes that ever arrived, so a connection dropped mid-shard is never taken for a shard
    that never answered (webdataset's pipe dropped the bytes it had read when curl failed, so the count stayed 0).
    Reads that the bytes before a failure satisfy are served; the first one they cannot raises the failure. A
    short read means the clean end of the data; an end that was not clean (a command's error status, a body
    shorter than its Content-Length) raises instead."""

    def __init__(self, url: str, read1: Callable[[int], bytes], finish: Callable[[], None],
                 close: Callable[[], None]):
        self.url, self._read1, self._finish, self._close = url, read1, finish, close
        self.received = 0
        self._buf, self._off = b"", 0
        self._error: Optional[OSError] = None
        self._ended = False

    def _fill(self, n: int) -> None:
        """Buffer at least `n` bytes, or all there are; a failure is kept for the next read."""
        need = n - (len(self._buf) - self._off)
        if need <= 0 or self._ended or self._error is not None:
            return
        parts = [self._buf[self._off:]]
        try:
            while need > 0:
                chunk = self._read1(max(need, _CHUNK))
                if not chunk:
                    self._ended = True
                    self._finish()
                    break
                self.received += len(chunk)
                parts.append(chunk)
                need -= len(chunk)
        except OSError as e:
            self._error = e
        except Exception as e:  # noqa: BLE001 - transport errors that are not OSErrors
            self._error = OSError(f"{type(e).__name__}: {e}")
        finally:
            self._buf, self._off = b"".join(parts), 0

    def read(self, n: int) -> bytes:
        self._fill(n)
        have = len(self._buf) - self._off
        if have < n and self._error is not None:   # a short read means the end: this is a failure
            raise self._error
        take = min(n, have)
        out = self._buf[self._off:self._off + take]
        self._off += take
        return out

    def close(self) -> None:
        """Close without raising."""
        self._close()


_CHUNK = 1 << 16


def open_stream(url: str, timeout: Optional[float] = None) -> Stream:
    """Open a remote location for sequential reading, every wait bounded by `timeout` seconds (default
    DEFAULT_TIMEOUT); OSError when it cannot be opened (`Absent` when it says it does not exist)."""
    t = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if url.startswith(("http://", "https://")):
        parts = transports.open_http(url, t)
    elif url.startswith("pipe:"):
        parts = transports.open_pipe(url, t)
    elif url.startswith("file:"):
        path = local_path(url)
        f = open(path, "rb")
        parts = (f.read, lambda: None, f.close)
    else:
        parts = transports.open_fsspec(url, t)
    return Stream(url, *parts)


def read_small(url: str, timeout: Optional[float] = None, retries: int = 0) -> Optional[bytes]:
    """The whole content of a small file (a size file, a parquet) at a local or remote location; None if it is
    not there (or empty). A transport that keeps failing (refused, stalled, HTTP 503) raises OSError after
    `retries` more tries: that is no absent file, and saying so beats reading every shard through instead."""
    path = local_path(url)
    if path is not None:
        try:
            with open(path, "rb") as fh:
                return fh.read() or None
        except OSError:
            return None
    for attempt in range(max(0, int(retries)) + 1):
        try:
            s = open_stream(url, timeout)
            try:
                chunks = []
                while True:
                    b = s.read(1 << 20)
                    if not b:
                        break
                    chunks.append(b)
            finally:
                s.close()
            return b"".join(chunks) or None
        except Absent:
            return None
        except OSError:
            if attempt >= retries:
                raise
            time.sleep(backoff(attempt + 1))
    return None


def backoff(attempt: int) -> float:
    """Seconds to wait before try `attempt` (1, 2, ...) of a remote read: 0.2, 0.4, 0.8, ... at most 5."""
    return min(0.1 * 2 ** attempt, 5.0)


def sibling(url: str, name: str) -> Optional[str]:
    """The location of file `name` in the same folder as shard `url`, in the same form.

    For a pipe the command's argument naming the shard is rewritten (`pipe:curl -s https://h/a/0001.tar` ->
    `pipe:curl -s https://h/a/sizes.json`); None if no argument of the command names a .tar."""
    if url.startswith("pipe:"):
        tokens = url.split(" ")
        for i in range(len(tokens) - 1, -1, -1):
            tok = tokens[i].strip("'\"")
            if ".tar" in tok:
                head = tok[:tok.rfind("/") + 1]
                tokens[i] = tokens[i].replace(tok, head + name)
                return " ".join(tokens)
        return None
    if is_remote(url):
        return url[:url.rfind("/") + 1] + name
    return os.path.join(os.path.dirname(url), name)


def shard_name(url: str) -> str:
    """The shard's file name (`00001.tar`), also for pipe: commands."""
    if url.startswith("pipe:"):
        tok = next((t.strip("'\"") for t in reversed(url.split(" ")) if ".tar" in t), url)
        return tok.rsplit("/", 1)[-1]
    return url.rsplit("/", 1)[-1] if is_remote(url) else os.path.basename(url)


def _short(url: str) -> str:
    return url if len(url) < 120 else url[:117] + "..."
