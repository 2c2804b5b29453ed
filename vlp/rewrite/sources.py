"""Reading captions to rewrite (or to train a tokenizer on): webdataset shards, a CSV, or a text file.

Every reader yields `Record(key, caption, rewrites, extra)` in a fixed order (shards in the order
given, samples in tar order), so that a rerun sees the same sequence and can skip what is done.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from braceexpand import braceexpand


class InputError(ValueError):
    """Bad input the user must fix; the message is one line."""


@dataclass
class Record:
    key: str
    caption: str
    rewrites: list[str] = field(default_factory=list)  # from a shard sample's .json, when present
    extra: Optional[str] = None  # the CSV relpath column; for shards the sample's json `source`, if any


def expand_shards(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/*.tar` -> tar paths, in order; every one must exist."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        for p in braceexpand(part):
            matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            if not matches:
                raise InputError(f"no shard matches {p}")
            urls.extend(matches)
    if not urls:
        raise InputError(f"no shards in {spec!r}")
    for u in urls:
        if not os.path.isfile(u):
            raise InputError(f"shard not found: {u}")
    return urls


def detect_format(path: str) -> str:
    if ".tar" in path or "::" in path or "{" in path:
        return "shards"
    if path.endswith(".csv"):
        return "csv"
    return "txt"


def _clean_line(s: str) -> str:
    return " ".join(s.split())


def iter_shards(urls: list[str], field_name: str = "rewrites") -> Iterator[Record]:
    """Every sample, keyed as the loader and `add_rewrites` key it (`vlp.data.tario`); the caption is its `.txt`,
    else the `caption` in its `.json`, else empty (so that row i is always the i-th sample)."""
    from vlp.data.tario import TarError, iter_samples

    for url in urls:
        try:
            for _, key, files in iter_samples(url, exts=("txt", "json")):
                yield _shard_record(key, files, field_name)
        except TarError as e:
            raise InputError(f"cannot read shard: {str(e).splitlines()[0][:200]}") from None


def _shard_record(key: str, files: dict[str, bytes], field_name: str) -> Record:
    meta = None
    raw = files.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            meta = None
    meta = meta if isinstance(meta, dict) else {}
    txt = files.get("txt")
    # keep the sample (and the row order) even without a .txt
    caption = txt.decode("utf-8", errors="replace") if txt is not None else str(meta.get("caption", ""))
    got = meta.get(field_name)
    rewrites = [_clean_line(str(r)) for r in got if str(r).strip()] if isinstance(got, list) else []
    source = meta.get("source")
    return Record(key=key, caption=_clean_line(caption), rewrites=rewrites,
                  extra=str(source) if source is not None else None)


def iter_csv(path: str) -> Iterator[Record]:
    """LaCLIP's `relpath,caption` rows (no header); the relpath is the key."""
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row:
                raise InputError(f"{path}:{lineno}: empty row (every row needs relpath,caption)")
            if len(row) < 2:
                raise InputError(f"{path}:{lineno}: expected 'relpath,caption', got {len(row)} field")
            relpath, caption = row[0], ",".join(row[1:])
            yield Record(key=relpath, caption=_clean_line(caption), extra=relpath)


def iter_txt(path: str) -> Iterator[Record]:
    """One caption per line; the key is the 0-based line number."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            yield Record(key=str(i), caption=_clean_line(line.rstrip("\n")))


def open_input(path: str, fmt: str = "auto", field_name: str = "rewrites") -> tuple[str, Iterator[Record], Optional[int]]:
    """(format, records, total or None) for `path` in the given or detected format."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "shards":
        urls = expand_shards(path)
        return fmt, iter_shards(urls, field_name), shard_total(urls)
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    if fmt == "csv":
        return fmt, iter_csv(path), _count_lines(path)
    if fmt == "txt":
        return fmt, iter_txt(path), _count_lines(path)
    raise InputError(f"unknown input format {fmt!r} (shards, csv or txt)")


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def shard_total(urls: list[str]) -> Optional[int]:
    """Samples in these shards from their size files (`vlp.data.shards.shard_size`), if those cover all."""
    from vlp.data.shards import shard_size

    sizes = [shard_size(u) for u in urls]
    return None if any(n is None for n in sizes) else sum(sizes)
