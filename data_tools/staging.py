"""Staging folders that name their owner, so that the leftovers of a killed run can be told from a live one's.

A tool writes into `OUT/.make_shards-<random>/` and moves the result in at the end; a SIGKILLed run (OOM killer,
`scancel`, a node lost) never reaches its cleanup, and its folder stayed for ever (3.4 MB in issue 22.19). Each
folder now holds `owner.json` (host, pid, the process's start time); a later run removes the folders whose owner
ran on this host and is gone (no such pid, or the pid now belongs to a process started at another time). Folders of
other hosts, and folders without an owner file, are left alone: nothing says their writer is dead.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

from vlp.runtime.peers import alive

OWNER = "owner.json"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]


def make(parent: Path, prefix: str) -> Path:
    """A new staging folder in `parent` holding its owner file (this host, this process)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    pid = os.getpid()
    (folder / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}))
    return folder


def is_abandoned(folder: Path) -> bool:
    """True when `folder`'s owner ran on this host and is no longer running."""
    try:
        owner = json.loads((folder / OWNER).read_text())
        host, pid, start = owner["host"], int(owner["pid"]), owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    if not alive(pid):
        return True
    now = _start_time(pid)
    return start is not None and now is not None and now != start   # the pid was reused by another process


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the abandoned staging folders `parent/prefix*`; the ones removed."""
    gone = []
    for folder in sorted(parent.glob(f"{prefix}*")) if parent.is_dir() else []:
        if folder.is_dir() and is_abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone
