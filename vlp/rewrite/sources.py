"""Reading captions to rewrite (or to train a tokenizer on): webdataset shards, a CSV, or a text file.

Every reader yields `Record(key, caption, rewrites, extra)` in a fixed order (shards in the order
given, samples in tar order), so that a rerun sees the same sequence and can skip what is done.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional


class InputError(ValueError):
    """Bad input the user must fix; the message is one line."""


@dataclass
class Record:
    key: str
    caption: str
    rewrites: list[str] = field(default_factory=list)  # from a shard sample's .json, when present
    extra: Optional[str] = None  # the CSV relpath column; for shards the sample's json `source`, if any


def expand_shards(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/*.tar` -> shard locations, in order (`vlp.data.shards.resolve`); local ones must exist."""
    from vlp.data.errors import DataError
    from vlp.data.shards import shard_urls
    from vlp.data.streams import local_path

    try:
        urls = shard_urls(spec)
    except DataError as e:
        raise InputError(str(e)) from None
    for u in urls:
        path = local_path(u)
        if path is not None and not os.path.isfile(path):
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
    from vlp.data.tario import TarError, read_shard

    for url in urls:
        try:
            for s in read_shard(url, exts=("txt", "json")):
                yield _shard_record(s, field_name)
        except TarError as e:
            raise InputError(f"cannot read shard: {str(e).splitlines()[0][:200]}") from None


def _shard_record(s, field_name: str) -> Record:
    """A shard sample as a Record, parsed as the loader parses it (`vlp.data.tario.Sample`)."""
    from vlp.data.errors import SkipSample

    try:
        caption = s.caption()
    except SkipSample:   # keep the sample (and the row order) even without a usable caption
        caption = ""
    rewrites = [_clean_line(r) for r in s.rewrites(field_name) if r.strip()]
    source = s.meta().get("source")
    return Record(key=s.key, caption=_clean_line(caption), rewrites=rewrites,
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
