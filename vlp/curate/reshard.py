"""`vlp data reshard`: write the samples `vlp data filter` kept as new shards.

    vlp data reshard --decisions pool_filter/decisions.tsv --output curated/ --per-shard 10000

Every member of a kept sample is copied byte for byte (image, caption, `.json` with rewrites, anything else),
in the pool's order, under its own key (a key met twice, from two sources, gets `_2`, `_3`... so that no two
samples merge). Written as make_shards writes: into a hidden staging folder inside --output (one left by a killed
run is removed by the next), moved into place with
`sizes.json` and `stats.json` only once every kept sample was found; --overwrite replaces only this
--prefix's shards. A shard that changed since it was embedded (a kept key missing) stops the run, one line,
and --output stays as it was.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from vlp.curate.store import CurateError
from vlp.flags import Parser

STAGING_PREFIX = ".reshard-"   # owner-tagged (data_tools.staging): a killed run's folder is removed by the next


def read_decisions(path: str) -> tuple[dict[str, list[str]], Counter]:
    """-> (kept keys per shard, in order; removed count per reason)."""
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"decisions file not found: {path}")
    lines = p.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[:3] != ["shard", "key", "reason"]:
        raise CurateError(f"{path} is not a `vlp data filter` decisions.tsv (header shard, key, reason)")
    kept: dict[str, list[str]] = {}
    removed: Counter = Counter()
    for line in lines[1:]:
        shard, key, reason = (line.split("\t") + ["", ""])[:3]
        if reason:
            removed[reason] += 1
        else:
            kept.setdefault(shard, []).append(key)
    return kept, removed


def reshard(decisions: str, output: str, per_shard: int = 10000, prefix: str = "", overwrite: bool = False) -> dict:
    from data_tools import staging as staging_folders
    from data_tools.outputs import check_name, own_shards

    kept, removed = read_decisions(decisions)
    out = Path(output)
    if per_shard < 1:
        raise CurateError("--per-shard must be at least 1")
    check_name(out, prefix, "--prefix", CurateError)
    if own_shards(out, prefix) and not overwrite:
        raise CurateError(f"{out} already holds {prefix}NNNNN.tar shards (use --overwrite or another --output)")
    if not kept:
        raise CurateError(f"{decisions} keeps no sample; {out} is unchanged")
    out.mkdir(parents=True, exist_ok=True)
    for gone in staging_folders.sweep(out, STAGING_PREFIX):
        print(f"removed {gone}: the staging folder of a reshard that was killed", file=sys.stderr)
    staging = staging_folders.make(out, STAGING_PREFIX)
    try:
        return _write(kept, removed, decisions, out, staging, per_shard, prefix)
    except OSError as e:   # a full disk, a quota: the staging folder goes, the input shards were only read
        raise CurateError(f"cannot write the new shards in {out}: {e.strerror or e}; "
                          f"{out} keeps its earlier shards and the input is untouched") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(kept: dict, removed: Counter, decisions: str, out: Path, staging: Path, per_shard: int,
           prefix: str) -> dict:
    """Copy the kept samples into `staging`, then move the shards into `out` (`data_tools.outputs.swap_in`)."""
    from data_tools.outputs import swap_in
    from vlp.data.tario import ShardWriter, TarError, read_shard

    seen: Counter = Counter()
    written = 0
    with ShardWriter(str(staging / f"{prefix}%05d.tar"), per_shard) as sink:
        for shard, keys in kept.items():
            want, found = set(keys), 0
            try:
                for s in read_shard(shard, retries=2):
                    if s.key in want:
                        seen[s.key] += 1
                        key = s.key if seen[s.key] == 1 else f"{s.key}_{seen[s.key]}"
                        sink.write(key, s.files)
                        found += 1
            except TarError as e:
                raise CurateError(str(e).splitlines()[0]) from None
            if found != len(want):
                raise CurateError(f"{shard}: {len(want) - found} kept keys are not in the shard (changed since "
                                  f"it was embedded?); {out} is unchanged")
            written += found
        sizes = dict(sink.sizes)
    n = len(sizes)
    spec = str(staging / (f"{prefix}{{00000..{n - 1:05d}}}.tar" if n > 1 else f"{prefix}00000.tar"))
    stats = {"input": str(decisions), "rows": written + sum(removed.values()), "written": written, "shards": n,
             "skipped": dict(sorted(removed.items())), "train_data": spec, "sizes": sizes}
    swap_in(staging, out, prefix, stats)
    return stats


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--decisions", required=True, help="decisions.tsv written by `vlp data filter`")
    p.add_argument("--output", "--out", dest="output", required=True, help="folder for the new shards")
    p.add_argument("--per-shard", type=int, default=10000)
    p.add_argument("--prefix", default="")
    p.add_argument("--overwrite", action="store_true", help="replace this --prefix's shards in --output")
    a = p.parse_args(argv)
    try:
        stats = reshard(a.decisions, a.output, a.per_shard, a.prefix, a.overwrite)
    except CurateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['written']} of {stats['rows']} samples in {stats['shards']} shards")
    print(f"--train-data '{stats['train_data']}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
