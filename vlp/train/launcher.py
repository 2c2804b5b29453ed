"""The launcher's death: a rank whose torchrun agent (or `accelerate launch`, which runs the same agent) is killed.

The agent is not protected by anything (reference: torchrun `--max-restarts`): SIGKILLed or OOM-killed, it leaves
its ranks orphaned, re-parented to PID 1 or a subreaper. Collectives between the ranks still work (gloo and NCCL
talk rank to rank), but the agent hosted the c10d store, so the first thing that needs it (a new process group,
the end of the run) fails with a c10d `Broken pipe` deep in C++, after every remaining step was trained for
nobody. So each rank started by an agent watches its parent: a thread compares `os.getppid()` with the agent's
pid twice a second (a parent-death signal, `PR_SET_PDEATHSIG`, fires when the *thread* that forked the rank ends,
which the agent does not promise to keep). When it changes the rank asks to stop as a stop signal does: the
step's one all-reduce (`vlp.train.health.agree`) makes every rank finish the step, save once together and exit
75 (`LauncherGone`), to be continued by the next launch with `--resume latest`.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from vlp.runtime.preemption import Preempted, StopSignals

POLL_S = 0.5


class LauncherGone(Preempted):
    """The agent that started this rank died; the ranks saved their state together (exit 75, one line)."""

    label = "launcher gone"


class LauncherWatch:
    """Watches the agent that started this process (under torchrun only) and turns its death into a stop request."""

    def __init__(self, signals: StopSignals, env: Optional[dict] = None):
        env = os.environ if env is None else env
        self.signals = signals
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in env else None
        self.noticed_at: Optional[float] = None
        self._gone, self._closed = threading.Event(), threading.Event()
        if self.parent is not None:
            threading.Thread(target=self._watch, daemon=True, name="vlp-launcher-watch").start()

    def __enter__(self) -> "LauncherWatch":
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()   # the run is over: a sweep of runs in one process leaves no watchers behind

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            if self._closed.wait(POLL_S):
                return
        self.noticed_at = time.monotonic()
        self._gone.set()
        if self.signals.received is None:
            self.signals.received = signal.SIGHUP   # the loop's stop request (its name is not shown: see stopped)

    def stopped(self, checkpoints: Path, wait_s: float = 2 * POLL_S + 1) -> Optional[LauncherGone]:
        """After a stop was saved: the error to end with if the stop was the launcher's death, else None. When the
        stop came from another rank's watch, this one notices within a poll: waited for, up to `wait_s`."""
        if self.parent is None:
            return None
        if not self._gone.is_set() and not (self.signals.received is None and self._gone.wait(wait_s)):
            return None
        from vlp.runtime.checkpoint import list_checkpoints

        found = list_checkpoints(checkpoints)
        return LauncherGone(f"state saved at step {found[-1][0] if found else 0}; continue with --resume latest")
