"""A folder held by one process at a time: `fcntl.flock` on a lock file inside it.

The kernel drops the lock when its holder dies, however it dies, so a killed holder never blocks the next one;
the file names the holder (pid, host, since when) for the message a second process gets.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional


class FolderLock:
    """`take()` the lock file `path` (None, or who holds it); `release()` when done."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def take(self) -> Optional[str]:
        """Hold the lock without waiting: None on success, else who holds it ("pid N on HOST since T").
        OSError when the lock file cannot be opened."""
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            return holder
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n")
        fh.flush()
        self._fh = fh
        return None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()   # closing the file releases the lock
            self._fh = None


def now() -> str:
    """The current UTC time, to the second (ISO 8601)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
