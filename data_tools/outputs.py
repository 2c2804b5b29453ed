"""Where the data tools may write: only inside the output folder they were given, and only their own files.

A name (a shard prefix, a run name) that is a path (`../../x_`), or a `%` that the shard writer would read
as a format, is refused before anything is written; `--overwrite` then cannot reach outside either. A tool writes its shards into a staging folder and moves
them in at the end (`swap_in`), replacing only the shards of its own prefix.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path


def check_name(folder: str | os.PathLike, name: str, flag: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` (one line) unless files named `name...` would land directly inside `folder`."""
    if "%" in name:
        raise error(f"{flag} {name!r}: may not contain '%'")
    probe = Path(folder, f"{name}probe")
    if os.sep in name or (os.altsep and os.altsep in name) or name in (".", "..") or \
            probe.resolve().parent != Path(folder).resolve():
        raise error(f"{flag} {name!r} is a path: it must name files inside {folder} (no '/' or '..')")


def own_shards(out: Path, prefix: str) -> list[Path]:
    """This prefix's shards in `out` (`{prefix}00000.tar`, ...): the only files --overwrite may replace."""
    pattern = re.compile(re.escape(prefix) + r"\d{5,}\.tar")
    return sorted(p for p in out.glob("*.tar") if pattern.fullmatch(p.name)) if out.is_dir() else []


def swap_in(staging: Path, out: Path, prefix: str, stats: dict) -> None:
    """Move the new shards over the old ones of this prefix, drop its leftovers, merge sizes.json."""
    sizes = {}
    old_sizes = out / "sizes.json"
    if old_sizes.is_file():
        try:
            sizes = json.loads(old_sizes.read_text())
        except ValueError:
            sizes = {}
    mine = {p.name for p in own_shards(out, prefix)}
    sizes = {k: v for k, v in sizes.items() if k not in mine} if isinstance(sizes, dict) else {}
    new = own_shards(staging, prefix)
    for p in new:
        os.replace(p, out / p.name)
    for name in mine - {p.name for p in new}:
        (out / name).unlink(missing_ok=True)
    sizes.update(stats.pop("sizes"))
    stats["train_data"] = str(out / Path(stats["train_data"]).name)
    for name, text in (("sizes.json", json.dumps(sizes, indent=1)), ("stats.json", json.dumps(stats, indent=1))):
        (staging / name).write_text(text)
        os.replace(staging / name, out / name)
