"""Stop signals: SIGTERM, SIGINT and SIGUSR1 end a run at a step boundary with a checkpoint.

Schedulers warn before they kill (SLURM: `--signal=USR1@T`, then SIGTERM; `scancel` and torchrun
send SIGTERM; Ctrl-C is SIGINT). The handler only records the signal. The loop reads the flag in
the step's one all-reduce (`vlp.train.health.StepCheck`), so every rank sees a signal that reached
any rank in the same step, finishes that step, saves one checkpoint and exits with
`EXIT_PREEMPTED`. A second signal of the same kind, more than `REPEAT_WINDOW_S` after the first, ends the
process at once (its default action); one inside the window is the same request delivered twice (SLURM
signals every process of the step and torchrun relays the signal to its ranks as well).

DataLoader workers ignore the three signals (`worker_init`) unless their parent sends SIGTERM: SLURM,
torchrun and Ctrl-C signal the whole process group, and torch's worker set-up makes a SIGTERM from anyone but
the parent kill the worker, which the main process then reports as a crash instead of finishing its step.
The signals are blocked while the workers are forked (`start_workers`), so none lands in the moment before
a worker ignores it; the main process receives such a signal as soon as the workers have started.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Optional

# sysexits' EX_TEMPFAIL ("try again later"): nothing is wrong; run the same command with `--resume latest`.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# A repeat inside this window is a relay of the same request, not a user asking twice.
REPEAT_WINDOW_S = 3.0


class Preempted(Exception):
    """The run stopped on a signal after saving its state; the message says where (one line)."""


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT/SIGUSR1 set `received` instead of killing the process."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict = {}
        self._first: dict = {}  # signal -> when it first arrived

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if now - self._first.setdefault(signum, now) > REPEAT_WINDOW_S:  # asked twice: stop now, as without us
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


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker ignores stop signals (the main process answers them).

    SIGINT and SIGUSR1 are ignored outright. SIGTERM stays blocked and a thread takes it: from the worker's
    parent it still ends the worker at once, as torch's handler does (the parent's `terminate()` of a stuck
    worker, multiprocessing's at-exit clean-up); from anyone else (a process-group signal) it is dropped."""
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # in every thread the worker starts from now on
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})
    parent = os.getppid()
    threading.Thread(target=_sigterm_from_parent_only, args=(parent,), daemon=True, name="vlp-worker-sigterm").start()
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """A worker whose process is killed (SIGKILL, the OOM killer) ends with it at once (Linux): its copies of
    the process group's sockets would otherwise keep the dead rank's connections open, so the other ranks
    would learn of the death only when torch's watchdog ends the orphan (5 s) instead of at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    if os.getppid() != parent:   # died before the line above took effect
        os._exit(0)


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def start_workers(loader):
    """`iter(loader)` with the stop signals held back while its workers are forked (see `worker_init`)."""
    with _held(SIGNALS):
        return iter(loader)


@contextmanager
def _held(signals):
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
