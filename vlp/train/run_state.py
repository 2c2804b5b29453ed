"""Who holds a run folder, and how the run in it ended.

The lock: the main process holds `RUN/.lock` (`fcntl.flock`) for the run's life, so a second training given the
same `--logs/--name` (two jobs, a double submit) stops with one line before it reads or writes anything there.
The kernel drops the lock when its holder dies, however it dies, so a killed run never blocks its resume.

The status: `RUN/status.json`, replaced atomically by the main process: `running` once the run has started,
then `finished`, `preempted` (stopped by a signal with its state saved: run the same command with
`--resume latest`) or `failed` (exit 2 or a crash). Launchers do not pass the ranks' exit code 75 on (torchrun
exits 1 whatever its workers return), so a requeue script reads the state from this file instead. It also
names the newest checkpoint and its step. A run refused before it started (a bad flag, a folder in use or
already holding a run) leaves the folder's status as it was.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

from vlp.config import ConfigError
from vlp.runtime import checkpoint as ckpt
from vlp.runtime.lock import FolderLock, now as _now
from vlp.train.health import TrainingError
from vlp.train.run_log import RunPaths

LOCK, STATUS = ".lock", "status.json"


class RunFolder:
    """Context manager around a run: `hold()` the folder, `start()` the run, and on exit record how it ended."""

    def __init__(self, root: Path):
        self.root = root
        self.peers = None   # vlp.runtime.peers.Peers, once the processes are up: names a lost rank
        self._lock: Optional[FolderLock] = None
        self._started = False

    def hold(self) -> Optional[str]:
        """Take the folder's lock (main process only); None, or one line saying who holds it."""
        lock = FolderLock(self.root / LOCK)
        try:
            RunPaths(self.root).create()
            holder = lock.take()
        except (ConfigError, OSError) as e:
            return str(e) if isinstance(e, ConfigError) else f"cannot write the run folder {self.root}: {e.strerror}"
        if holder is None:
            self._lock = lock
            return None
        return (f"run folder {self.root} is in use by another training ({holder}): "
                f"pass another --name, or wait for that run to end")

    def start(self, step: int) -> None:
        """The run is under way (from `step`); from now on its end is recorded."""
        self._started = self._lock is not None
        self._write("running", None, "", step=step)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from vlp.runtime.preemption import EXIT_PREEMPTED, Preempted

        if self._started:
            if exc is None:
                self._write("finished", 0, "")
            elif isinstance(exc, Preempted):
                self._write("preempted", EXIT_PREEMPTED, str(exc))
            elif isinstance(exc, Exception):   # train.py's exit code: 2 for an error it words, 1 for a crash
                self._write("failed", 2 if isinstance(exc, (ConfigError, TrainingError)) else 1,
                            ckpt.first_line(exc, limit=1000), reason=getattr(exc, "reason", None))
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _write(self, state: str, code: Optional[int], message: str, step: Optional[int] = None,
               reason: Optional[str] = None) -> None:
        if not self._started:
            return
        found = ckpt.list_checkpoints(self.root / "checkpoints")
        record = {"state": state, "exit_code": code, "message": message, "pid": os.getpid(),
                  "host": socket.gethostname(), "time": _now(),
                  "checkpoint": str(found[-1][1]) if found else None,
                  "checkpoint_step": found[-1][0] if found else None}
        if step is not None:
            record["step"] = step
        if reason is not None:   # a failure a restart may cure: "collective timeout", "rank lost"
            record["reason"] = reason
        try:
            ckpt.atomic_write_bytes(self.root / STATUS, (json.dumps(record, indent=1) + "\n").encode())
        except ckpt.CheckpointWriteError:
            pass   # a full disk: the run's own error says so; the status stays what it was


def read_status(root: Path) -> Optional[dict]:
    """A run folder's status.json, or None when it has none."""
    try:
        return json.loads((root / STATUS).read_text())
    except (OSError, ValueError):
        return None

