"""Where shard bytes come from: a local file (seekable) or a stream (`pipe:CMD`, `http(s)://`, any fsspec URL).

`pipe:`, `http://`, `https://` and `file:` are opened by webdataset's `gopen` (curl for HTTP, a shell for
pipes), `s3://`, `gs://` and every other `scheme://` by fsspec (an optional dependency: `pip install fsspec`
plus the filesystem's package, e.g. `s3fs`, `gcsfs`). Nothing here retries: `vlp.data.tario.read_shard` does.
"""
from __future__ import annotations

import os
import re
from typing import BinaryIO, Optional
from urllib.parse import urlparse

_GOPEN_SCHEMES = ("pipe:", "http://", "https://", "file:")
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
    """A readable byte stream with the failures of its transport raised as OSError.

    A short read means the end of the data; a pipe (curl included) whose command then exits with an error
    status raises OSError instead, so that a dropped connection is not mistaken for a short shard."""

    def __init__(self, f: BinaryIO, url: str):
        self.f, self.url = f, url

    def read(self, n: int) -> bytes:
        try:
            data = self.f.read(n)
            while data is not None and 0 < len(data) < n:
                more = self.f.read(n - len(data))
                if not more:
                    break
                data += more
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec/aiohttp transport errors are not OSErrors
            raise OSError(f"{type(e).__name__}: {e}") from None
        if data is None or len(data) < n:
            self._check_exit()
        return data or b""

    def _check_exit(self) -> None:
        proc = getattr(self.f, "proc", None)   # webdataset's Pipe
        if proc is None:
            return
        status = proc.wait()
        if status not in getattr(self.f, "ignore_status", [0]):
            raise OSError(f"{_short(self.url)}: command exited with status {status}")

    def close(self) -> None:
        """Close without raising: a pipe closed before its end exits with SIGPIPE, which is no error here."""
        proc = getattr(self.f, "proc", None)
        try:
            if proc is not None and proc.poll() is None:
                proc.kill()
            self.f.close()
        except Exception:  # noqa: BLE001
            pass


def open_stream(url: str) -> Stream:
    """Open a remote location for sequential reading; OSError when it cannot be opened."""
    try:
        if url.startswith(_GOPEN_SCHEMES):
            from webdataset.gopen import gopen

            return Stream(gopen(url, "rb"), url)
        try:
            import fsspec
        except ImportError:
            raise OSError(f"reading {url.split('://')[0]}:// needs fsspec: pip install fsspec "
                          "(and its filesystem, e.g. s3fs or gcsfs)") from None
        return Stream(fsspec.open(url, "rb").open(), url)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown protocol, missing fsspec backend, ...
        raise OSError(f"{type(e).__name__}: {e}") from None


def read_small(url: str) -> Optional[bytes]:
    """The whole content of a small file (a size file, a parquet) at a local or remote location; None if absent."""
    path = local_path(url)
    try:
        if path is not None:
            with open(path, "rb") as fh:
                return fh.read()
        s = open_stream(url)
        try:
            chunks = []
            while True:
                b = s.read(1 << 20)
                if not b:
                    break
                chunks.append(b)
            data = b"".join(chunks)
        finally:
            s.close()
        return data or None
    except OSError:
        return None


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
