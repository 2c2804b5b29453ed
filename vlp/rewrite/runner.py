"""Run a rewriter over a caption stream and write LaCLIP-style outputs, resumably.

Output folder layout (NAME defaults to "captions"):

- `--format lines` (LaCLIP's): `NAME_original.csv` (rows `key,caption`, no header: for a CSV input the
  relpath, for shards the `source` in the sample's json if any, else the sample key; for a text file the
  line number) and `NAME_SOURCE.txt`, one rewrite
  per line, all in the same row order.
- `--format jsonl`: `NAME_rewrites.jsonl`, one `{"key": ..., "rewrites": [...]}` per sample, rewrites in
  source order (listed in `NAME.run.json`).
- `NAME.run.json` (settings; a rerun with other settings is refused), `NAME.progress.json` (samples done,
  guard counts: written after the outputs of each batch are flushed and fsync'ed), `NAME.summary.json`.

A rerun continues after the last batch recorded in the progress file: each output is first cut back to
exactly that many lines (dropping a partial last line or lines written after the last record), so an
interrupted run never duplicates or drops a line.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter, deque
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

from vlp.progress import progress_bar

from vlp.rewrite.prompt import GUARD_REASONS, guard, one_line
from vlp.rewrite.sources import InputError, Record
from vlp.runtime.checkpoint import atomic_write_bytes

FORMATS = ("lines", "jsonl")


class Outputs:
    """The files of one rewrite run and their resume bookkeeping."""

    def __init__(self, out_dir: str, name: str, fmt: str, sources: list[str]):
        if fmt not in FORMATS:
            raise InputError(f"--format must be one of {', '.join(FORMATS)}")
        self.dir = Path(out_dir)
        self.name, self.fmt, self.sources = name, fmt, sources
        if fmt == "lines":
            self.paths = [self.dir / f"{name}_original.csv"] + [self.dir / f"{name}_{s}.txt" for s in sources]
        else:
            self.paths = [self.dir / f"{name}_rewrites.jsonl"]
        self.run_path = self.dir / f"{name}.run.json"
        self.progress_path = self.dir / f"{name}.progress.json"
        self.summary_path = self.dir / f"{name}.summary.json"

    def all_paths(self) -> list[Path]:
        return self.paths + [self.run_path, self.progress_path, self.summary_path]

    def prepare(self, settings: dict, overwrite: bool) -> dict:
        """Start fresh or resume; returns the progress record ({"done", "last_key", "counts"})."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in self.all_paths():
                p.unlink(missing_ok=True)
        if self.run_path.exists():
            old = json.loads(self.run_path.read_text())
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise InputError(f"{self.dir} holds a rewrite run '{self.name}' with other settings "
                                 f"({', '.join(diff)}); use --overwrite or another --out/--name")
        else:
            stray = [p for p in self.paths if p.exists()]
            if stray:
                raise InputError(f"{stray[0]} exists but is not from a vlp rewrite run; use --overwrite")
            atomic_write_bytes(self.run_path, json.dumps(settings, indent=1).encode())
        progress = {"done": 0, "last_key": None, "counts": {}}
        if self.progress_path.exists():
            progress = json.loads(self.progress_path.read_text())
        for p in self.paths:
            have = truncate_lines(p, progress["done"]) if p.exists() else 0
            if have < progress["done"]:
                raise InputError(f"{p} has {have} complete lines but the progress file says {progress['done']}; "
                                 "the output was changed by hand: use --overwrite")
        return progress

    def append(self, keys: list[str], captions: list[str], rewrites: list[list[str]]) -> None:
        """Append one batch to every output and make it durable."""
        if self.fmt == "lines":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for k, c in zip(keys, captions):
                w.writerow([one_line(k), c])
            chunks = [buf.getvalue()] + ["".join(r[j] + "\n" for r in rewrites) for j in range(len(self.sources))]
        else:
            chunks = ["".join(json.dumps({"key": k, "rewrites": r}, ensure_ascii=False) + "\n"
                              for k, r in zip(keys, rewrites))]
        for p, chunk in zip(self.paths, chunks):
            with open(p, "a", encoding="utf-8", newline="") as f:
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())

    def save_progress(self, progress: dict) -> None:
        atomic_write_bytes(self.progress_path, json.dumps(progress).encode())


def truncate_lines(path: Path, n: int, chunk: int = 1 << 20) -> int:
    """Cut `path` after its n-th newline (or after its last newline if it has fewer); returns the number of
    complete lines it had, capped at n."""
    count, offset, end = 0, 0, 0
    with open(path, "rb") as f:
        while count < n:
            block = f.read(chunk)
            if not block:
                break
            start = 0
            while count < n:
                i = block.find(b"\n", start)
                if i < 0:
                    break
                count += 1
                end = offset + i + 1
                start = i + 1
            offset += len(block)
    if os.path.getsize(path) != end:
        with open(path, "r+b") as f:
            f.truncate(end)
    return count


def _batches(it: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while True:
        batch = list(islice(it, size))
        if not batch:
            return
        yield batch


def run_rewrites(records: Iterable[Record], rewriter, out_dir: str, *, name: str = "captions", fmt: str = "lines",
                 batch_size: int = 16, total: Optional[int] = None, limit: Optional[int] = None,
                 settings: Optional[dict] = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Rewrite every caption with `rewriter` (see vlp.rewrite.rewriters), guard each rewrite, write outputs.
    Returns the summary: samples, rewrites, replaced (by reason), unchanged, and per-source replacement counts."""
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    outputs = Outputs(out_dir, name, fmt, list(rewriter.sources))
    settings = {**(settings or {}), "format": fmt, **rewriter.describe()}
    state = outputs.prepare(settings, overwrite)
    done = state["done"]
    counts = Counter(state.get("counts", {}))
    it: Iterator[Record] = iter(records)
    if limit is not None:
        it = islice(it, limit)
        total = min(total, limit) if total is not None else limit
    if done > 1:
        deque(islice(it, done - 1), maxlen=0)  # skip what is done without holding it
    if done:
        last = next(it, None)
        if last is None or last.key != state.get("last_key"):
            raise InputError(f"the input changed since the interrupted run (sample {done} is "
                             f"{getattr(last, 'key', 'missing')!r}, was {state.get('last_key')!r}); use --overwrite")
    bar = progress_bar(total=total, initial=done, desc=f"rewriting ({', '.join(rewriter.sources)})", unit="caption",
               disable=not progress, dynamic_ncols=True)
    try:
        for batch in _batches(it, batch_size):
            captions = [one_line(r.caption) for r in batch]
            indices = list(range(done, done + len(batch)))
            candidates = rewriter.rewrite(captions, indices)
            rewrites = []
            for cap, row in zip(captions, candidates):
                kept = []
                for src, cand in zip(rewriter.sources, row):
                    text, reason = guard(cand.text, cap, cand.used_pairs) if cap else (cap, None)
                    if reason:
                        counts[f"replaced/{reason}"] += 1
                        counts[f"replaced_by_source/{src}"] += 1
                    elif text.lower() == cap.lower():
                        counts["unchanged"] += 1
                    counts["rewrites"] += 1
                    kept.append(text)
                rewrites.append(kept)
            if fmt == "lines":  # LaCLIP's first column is the image path: a shard sample's `source` when known
                keys = [r.extra if r.extra is not None else r.key for r in batch]
            else:
                keys = [r.key for r in batch]
            outputs.append(keys, captions, rewrites)
            done += len(batch)
            outputs.save_progress({"done": done, "last_key": batch[-1].key, "counts": dict(counts)})
            bar.update(len(batch))
    finally:
        bar.close()
    summary = {
        "samples": done,
        "rewrites": counts["rewrites"],
        "replaced": {r: counts[f"replaced/{r}"] for r in GUARD_REASONS},
        "replaced_total": sum(counts[f"replaced/{r}"] for r in GUARD_REASONS),
        "unchanged": counts["unchanged"],
        "replaced_by_source": {s: counts[f"replaced_by_source/{s}"] for s in rewriter.sources},
        "outputs": [str(p) for p in outputs.paths],
    }
    atomic_write_bytes(outputs.summary_path, json.dumps(summary, indent=1).encode())
    return summary
