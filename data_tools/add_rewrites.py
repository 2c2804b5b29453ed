"""Attach caption rewrites to existing shards, writing new shards (the input is never modified).

    # LaCLIP's published format: original CSV (relpath,caption; no header) + line-aligned rewrite files
    vlp data add-rewrites --shards 'cc3m/{00000..00331}.tar' --output cc3m_rw/ \\
        --laclip-csv cc3m_original.csv --laclip-texts cc3m_chatgpt.txt cc3m_bard.txt cc3m_mscoco.txt cc3m_human.txt
    # or a JSONL keyed by sample key: {"key": "000000123", "rewrites": ["...", "..."]}
    vlp data add-rewrites --shards shards/ --output shards_rw/ --jsonl rewrites.jsonl

Rewrites are stored as a list of strings in each sample's `.json` under `--field` (default `rewrites`,
what the loader's `--rewrites-field` reads), appended to any already there (duplicates dropped).
LaCLIP rows are matched to samples by the image path (`source` in the sample's json, as written by
make_shards) when present, otherwise by position (row i = i-th sample in shard order), checking that the
row's caption equals the sample's caption. Shards get the same file names in --output, with sizes.json;
when two sources hold shards of the same name (`cc3m/00000.tar::cc12m/00000.tar`) each output is prefixed
with its source folder's name (`cc3m_00000.tar`, `cc12m_00000.tar`), so no shard overwrites another.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from vlp.data.errors import DataError, SkipSample
from vlp.data.shards import shard_urls as _urls
from vlp.data.tario import ShardWriter, TarError, read_shard
from vlp.flags import Parser


def _read_text(path: str) -> str:
    """A UTF-8 text file, or one line saying where it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None


def load_laclip(csv_path: str, texts: list[str]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    rows = []
    for r in csv.reader(io.StringIO(_read_text(csv_path), newline="")):
        if not r:
            continue
        rows.append((r[0], r[1] if len(r) > 1 else ""))
    columns = []
    for t in texts:
        lines = _read_text(t).split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != len(rows):
            raise DataError(f"{t} has {len(lines)} lines but {csv_path} has {len(rows)} rows (must be line-aligned)")
        columns.append(lines)
    per_row = [[c[i].strip() for c in columns if c[i].strip()] for i in range(len(rows))]
    return rows, per_row


def load_jsonl(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            key = str(d["key"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: expected a JSON object with 'key' and 'rewrites'") from None
        rw = d.get("rewrites", d.get("rewrite", []))
        rw = [rw] if isinstance(rw, str) else rw
        if not isinstance(rw, list) or not all(isinstance(x, str) for x in rw):
            raise DataError(f"{path}:{n}: 'rewrites' must be a string or a list of strings (got {json.dumps(rw)[:60]})")
        out.setdefault(key, []).extend(rw)
    return out


def add_rewrites(shards: str, output: str, *, laclip_csv: Optional[str] = None, laclip_texts=None,
                 jsonl: Optional[str] = None, field: str = "rewrites", check_captions: bool = True) -> dict:
    urls = _urls(shards)
    out = Path(output)
    in_dirs = {os.path.realpath(os.path.dirname(u)) for u in urls}
    if os.path.realpath(out) in in_dirs:
        raise DataError("--output must differ from the input shards' folder (shards are never modified in place)")
    if bool(laclip_csv) == bool(jsonl):
        raise DataError("give either --laclip-csv with --laclip-texts, or --jsonl")
    by_key: dict[str, list[str]] = {}
    rows, per_row, by_source = [], [], {}
    if jsonl:
        by_key = load_jsonl(jsonl)
    else:
        if not laclip_texts:
            raise DataError("--laclip-csv needs --laclip-texts (one or more line-aligned rewrite files)")
        rows, per_row = load_laclip(laclip_csv, laclip_texts)
        by_source = {r[0]: i for i, r in enumerate(rows)}
    names = output_names(urls)
    out.mkdir(parents=True, exist_ok=True)
    stats = Counter()
    sizes = {}
    position = 0
    for url, name in zip(urls, names):
        dest = out / name
        writer = ShardWriter(str(dest) + ".partial", maxcount=1 << 62)
        n = 0
        try:
            for s in read_shard(url):
                key, files, meta = s.key, s.files, s.meta()
                try:
                    caption = s.caption()
                except SkipSample:
                    caption = ""
                if jsonl:
                    new = by_key.get(key, [])
                else:
                    row = by_source.get(meta.get("source")) if meta.get("source") is not None else None
                    if row is None:
                        row = position
                        if row >= len(rows):
                            raise DataError(f"more samples than rows in {laclip_csv} (at {url}: {key})")
                        if check_captions and " ".join(rows[row][1].split()) != " ".join(caption.split()):
                            raise DataError(f"row {row + 1} of {laclip_csv} does not match sample {key} of {url} "
                                            f"(captions differ); use --no-check-captions if order is known to match")
                    new = per_row[row]
                position += 1
                old = meta.get(field) or []
                old = [old] if isinstance(old, str) else list(old)
                merged = list(dict.fromkeys(old + list(new)))
                meta.setdefault("caption", caption)
                meta[field] = merged
                stats["with_rewrites" if merged else "without_rewrites"] += 1
                stats["rewrites_added"] += len(merged) - len(old)
                files = dict(files)
                files["json"] = json.dumps(meta).encode("utf-8")
                writer.write(key, files)
                n += 1
        except TarError as e:
            writer.close()
            raise DataError(f"cannot read {url}: {e}") from None
        writer.close()
        if n == 0:
            Path(str(dest) + ".partial").write_bytes(b"\0" * 1024)
        os.replace(str(dest) + ".partial", dest)
        sizes[name] = n
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    if jsonl:
        stats["unmatched_keys"] = len(set(by_key) - _all_keys(urls))
    return {"shards": len(urls), "samples": position, **stats, "outputs": names}


def output_names(urls: list[str]) -> list[str]:
    """Each input shard's output file name: its own, or `{source folder}_{name}` when two sources share names."""
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) < len(names):
        names = [f"{os.path.basename(os.path.dirname(u))}_{n}" for u, n in zip(urls, names)]
        if len(set(names)) < len(names):
            dup = next(u for u, n in zip(urls, names) if names.count(n) > 1)
            raise DataError(f"two input shards would both be written as {os.path.basename(dup)} (and their folders "
                            f"share a name too): rename one source's folder or run add_rewrites per source")
    return names


def _all_keys(urls) -> set[str]:
    keys = set()
    for u in urls:
        for s in read_shard(u, exts=()):
            keys.add(s.key)
    return keys


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--shards", required=True, help="input shard spec or folder")
    p.add_argument("--output", "--out", dest="output", required=True, help="folder for the new shards (not the input folder)")
    p.add_argument("--laclip-csv", help="LaCLIP original CSV (relpath,caption; no header)")
    p.add_argument("--laclip-texts", nargs="+", help="LaCLIP rewrite files, one rewrite per line, row-aligned")
    p.add_argument("--jsonl", help="JSONL with {'key': ..., 'rewrites': [...]} per line")
    p.add_argument("--field", default="rewrites", help="json field to store rewrites in (default: rewrites)")
    p.add_argument("--no-check-captions", action="store_true", help="positional LaCLIP matching without caption check")
    a = p.parse_args(argv)
    try:
        s = add_rewrites(a.shards, a.output, laclip_csv=a.laclip_csv, laclip_texts=a.laclip_texts, jsonl=a.jsonl,
                         field=a.field, check_captions=not a.no_check_captions)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
