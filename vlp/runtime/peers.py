"""Which rank was lost when a collective fails: a rank killed (the OOM killer, a SIGKILL) or its host gone.

gloo and NCCL report a dead peer as a connection error on the survivors, naming an address, not a rank. At the
start every rank learns every rank's (host, pid); when a collective fails, a survivor looks for a rank on its
own host whose process has ended (waiting briefly: the error can arrive while the dead process is still being
torn down). A connection error with no such rank names the ranks on other hosts.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

# What gloo, NCCL and the c10d store say when a peer's process or host went away.
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "remote process exited", "socket closed", "peer closed")


class Peers:
    """(host, pid) of every rank of the run, gathered once at the start (every rank must build it)."""

    def __init__(self, accelerator):
        self.rank, self.host = accelerator.process_index, socket.gethostname()
        self.ranks: list = [(self.host, os.getpid())] * accelerator.num_processes
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_gather_object(self.ranks, (self.host, os.getpid()))

    def lost(self, error: BaseException, wait_s: float = 3.0) -> Optional[str]:
        """One line naming the lost rank(s) if `error` is a peer gone, else None."""
        if len(self.ranks) < 2 or not isinstance(error, RuntimeError):
            return None
        local = [(r, pid) for r, (host, pid) in enumerate(self.ranks) if host == self.host and r != self.rank]
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(r, pid) for r, pid in local if not alive(pid)]
            if dead:
                return ", ".join(f"rank {r} (pid {pid})" for r, pid in dead) + f" ended during training on {self.host}"
            if time.monotonic() > deadline or not local:
                break
            time.sleep(0.1)
        if any(s in str(error).lower() for s in _PEER_GONE):
            remote = [r for r, (host, _) in enumerate(self.ranks) if host != self.host]
            who = f"a rank on another host (ranks {', '.join(map(str, remote))})" if remote else "another rank"
            return f"{who} stopped answering ({str(error).strip().splitlines()[0][:160]})"
        return None


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by its launcher, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
