"""Stop signals: SIGTERM, SIGINT and SIGUSR1 end a run at a step boundary with a checkpoint.

Schedulers warn before they kill (SLURM: `--signal=USR1@T`, then SIGTERM; `scancel` and torchrun
send SIGTERM; Ctrl-C is SIGINT). The handler only records the signal. The loop reads the flag in
the step's one all-reduce (`vlp.train.health.StepCheck`), so every rank sees a signal that reached
any rank in the same step, finishes that step, saves one checkpoint and exits with
`EXIT_PREEMPTED`. A second signal of the same kind ends the process at once (its default action).
DataLoader workers forked after the handlers are installed inherit them, so a signal sent to the
whole process group (Ctrl-C, SLURM) does not kill them mid-batch.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

# sysexits' EX_TEMPFAIL ("try again later"): nothing is wrong; run the same command with `--resume latest`.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after saving its state; the message says where (one line)."""


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT/SIGUSR1 set `received` instead of killing the process."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signum:  # asked twice: stop now, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop signal on another rank"

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and issubclass(exc_type, Preempted):
            # The process is on its way out with its state saved: a launcher that now signals every rank
            # (torchrun, once another rank has exited) must not turn exit code 75 into a kill.
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_stop_signals() -> None:
    """After a preemption, on the way out: the state is saved, so launchers' follow-up signals (torchrun
    signals the other ranks once one has exited) must not turn exit code 75 into a kill during the
    interpreter's shutdown (Python then drops its own handlers, but keeps SIG_IGN)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
