"""Where the data tools may write: only inside the output folder they were given, and only their own files.

A name (a shard prefix, a run name) that is a path (`../../x_`), or a `%` that the shard writer would read
as a format, is refused before anything is written; `--overwrite` then cannot reach outside either.
"""
from __future__ import annotations

import os
from pathlib import Path


def check_name(folder: str | os.PathLike, name: str, flag: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` (one line) unless files named `name...` would land directly inside `folder`."""
    if "%" in name:
        raise error(f"{flag} {name!r}: may not contain '%'")
    probe = Path(folder, f"{name}probe")
    if os.sep in name or (os.altsep and os.altsep in name) or name in (".", "..") or \
            probe.resolve().parent != Path(folder).resolve():
        raise error(f"{flag} {name!r} is a path: it must name files inside {folder} (no '/' or '..')")
