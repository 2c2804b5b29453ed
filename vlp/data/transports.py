"""The three ways vlp opens a remote location, each with every wait bounded by a timeout and no retry of its own
(retries are vlp's: `vlp.data.tario.ShardReader` counts and bounds them):

* `http(s)://`: urllib, the socket timeout bounding the connection and every read (a server that accepts and never
  sends, or stalls mid-body, raises `Stalled`); a body shorter than its Content-Length raises. webdataset's `curl`
  had no read timeout and retried a 503 thirty times inside each of vlp's attempts.
* `pipe:CMD`: a shell in its own process group, read with `select` so that a command that stops writing raises
  `Stalled` (the group is killed); an exit status other than 0 raises once its output ended.
* any other `scheme://`: fsspec, each open and read run under a watchdog thread (s3fs also gets its own connect and
  read timeouts and a single botocore attempt).

Each returns `(read1, finish, close)`: `read1(n)` gives what arrived (up to n bytes; b"" at the end), `finish()`
raises when the end was not a clean one, `close()` never raises.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Callable

from vlp.data.errors import Absent, Stalled

Opened = tuple[Callable[[int], bytes], Callable[[], None], Callable[[], None]]


def _stalled(timeout: float, what: str = "no byte") -> Stalled:
    return Stalled(f"{what} for {timeout:g} s (--shard-timeout)")


def open_http(url: str, timeout: float) -> Opened:
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "vlp"}), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        cls = Absent if e.code in (404, 410) else OSError
        raise cls(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise _stalled(timeout, "no answer") from None
        raise OSError(f"cannot connect: {e.reason}") from None
    except (socket.timeout, TimeoutError):
        raise _stalled(timeout, "no answer") from None
    except Exception as e:  # noqa: BLE001 - http.client errors (bad status line, reset) are not all OSErrors
        raise OSError(f"{type(e).__name__}: {e}") from None

    def read1(n: int) -> bytes:
        try:
            return resp.read1(n)
        except (socket.timeout, TimeoutError):
            raise _stalled(timeout) from None
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - IncompleteRead of a chunked body, ...
            raise OSError(f"{type(e).__name__}: {e}") from None

    def finish() -> None:
        if resp.length:   # bytes of the Content-Length that never came
            raise OSError(f"connection closed {resp.length} bytes before the end")

    def close() -> None:
        try:
            resp.close()
        except Exception:  # noqa: BLE001
            pass

    return read1, finish, close


# The command gets its own process group (all of a pipeline is killed on a stall), not its own session: a new
# session is a new scheduler autogroup, which halved the pipe's throughput on a busy machine.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def open_pipe(url: str, timeout: float) -> Opened:
    cmd = url[len("pipe:"):]
    try:
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, **_OWN_GROUP)
    except OSError as e:
        raise OSError(f"cannot start {_short(cmd)}: {e}") from None
    fd = proc.stdout.fileno()
    seen = [False]

    def kill() -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()

    def read1(n: int) -> bytes:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            kill()
            raise _stalled(timeout)
        data = os.read(fd, n)
        seen[0] = seen[0] or bool(data)
        return data

    def finish() -> None:
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill()
            raise _stalled(timeout, "no exit after its output ended") from None
        if status != 0:   # a command that failed before writing anything: most often, nothing is there
            cls = OSError if seen[0] else Absent
            raise cls(f"command exited with status {status}")

    def close() -> None:
        kill()   # a pipe closed before its end would exit with SIGPIPE, which is no error here
        try:
            proc.stdout.close()
        except OSError:
            pass

    return read1, finish, close


def deadline(fn: Callable, timeout: float):
    """`fn()` run on a daemon thread; `Stalled` when it has not returned within `timeout` seconds (the thread is
    left to its blocked call: nothing else can interrupt a read inside a library's own event loop)."""
    box: list = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box.append((False, e))
        done.set()

    threading.Thread(target=run, daemon=True, name="vlp-read").start()
    if not done.wait(timeout):
        raise _stalled(timeout, "no answer")
    ok, value = box[0]
    if ok:
        return value
    if isinstance(value, FileNotFoundError):
        raise Absent("not found") from None
    if isinstance(value, OSError):
        raise value
    raise OSError(f"{type(value).__name__}: {value}") from None


def open_fsspec(url: str, timeout: float) -> Opened:
    try:
        import fsspec
    except ImportError:
        raise OSError(f"reading {url.split('://')[0]}:// needs fsspec: pip install fsspec "
                      "(and its filesystem, e.g. s3fs or gcsfs)") from None
    kw = {}
    if url.split("://")[0] in ("s3", "s3a"):   # botocore's own retries and minute-long waits off: vlp's count
        kw["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}}
    f = deadline(lambda: fsspec.open(url, "rb", **kw).open(), timeout)

    def read1(n: int) -> bytes:
        return deadline(lambda: f.read(n), timeout)

    def close() -> None:
        try:
            f.close()
        except Exception:  # noqa: BLE001
            pass

    return read1, (lambda: None), close


def _short(url: str) -> str:
    return url if len(url) < 120 else url[:117] + "..."
