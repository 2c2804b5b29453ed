"""The one progress display of every vlp tool: tqdm's bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns; written to a file (SLURM, `2> log`, a pipe) every frame
stays in it, so one line of the log held hundreds of frames. `progress_bar(...)` takes tqdm's arguments and
returns tqdm itself when its stream is a terminal; otherwise a tqdm that prints a plain line at most
every `every` seconds (none for a job shorter than that) and, for a bar that tqdm would leave on screen,
one final line. No carriage return, no cursor movement, no line longer than tqdm's short format.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm

LINE_EVERY_S = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]"


def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress(tqdm):
    """tqdm's counting, rate and ETA, printed as whole lines (for streams that are not a terminal)."""

    def __init__(self, *args, every: float = LINE_EVERY_S, **kw):
        self._every, self._last_line, self._t_start = every, None, time.monotonic()
        self._wants_final = kw.get("leave", True) is not False
        kw["leave"] = False     # tqdm's own close would clear the line with a carriage return
        kw.setdefault("mininterval", min(every, 1.0))
        iterable = args[0] if args else kw.get("iterable")
        total = kw.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
        kw.setdefault("bar_format", LINE_FORMAT if total else LINE_FORMAT_NO_TOTAL)
        super().__init__(*args, **kw)

    def display(self, msg=None, pos=None):
        if msg == "":            # tqdm clearing the bar: nothing to clear in a log
            return False
        now = time.monotonic()
        since = now - (self._last_line if self._last_line is not None else self._t_start)
        if msg is None and since < self._every:
            return True
        self._write(self.__str__() if msg is None else msg)
        self._last_line = now
        return True

    def _write(self, line: str) -> None:
        line = line.rstrip()
        if line != getattr(self, "_last_text", None):
            self.fp.write(line + "\n")
            self.fp.flush()
        self._last_text = line

    def clear(self, nolock=False):
        pass

    def moveto(self, n):
        pass

    def close(self):
        if not self.disable and (self._wants_final or self._last_line is not None):
            self._write(self.__str__())
        super().close()


def progress_bar(iterable=None, *, file=None, every: Optional[float] = None, **kw) -> tqdm:
    """tqdm(iterable, **kw) on a terminal; `LineProgress` otherwise (`file` defaults to stderr, as tqdm's;
    `every` to LINE_EVERY_S)."""
    stream = file if file is not None else sys.stderr
    if isatty(stream) or kw.get("disable"):
        return tqdm(iterable, file=stream, **kw)
    kw.pop("dynamic_ncols", None)
    kw.pop("ncols", None)
    return LineProgress(iterable, file=stream, every=LINE_EVERY_S if every is None else every, **kw)
