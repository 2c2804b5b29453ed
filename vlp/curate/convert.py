"""`vlp data convert-tables`: rewrite a folder's `.npz` embed tables (vlp before 0.2) as Parquet tables.

    vlp data convert-tables --embeddings pool_emb

Each table is read, written as `NNNNNN.parquet` (atomically) and only then is its `.npz` removed, so a run
killed half way leaves every shard in one of the two formats, both read by `vlp data filter`; run it again
to finish. `--engine ray` reads Parquet only.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from vlp.flags import Parser
from vlp.curate.store import LEGACY, PARQUET, CurateError, read_table, write_table


def convert(folder: str, log=print) -> int:
    files = sorted(Path(folder).glob("[0-9]" * 6 + LEGACY))
    for i, path in enumerate(files):
        t = read_table(path)
        if t is None:
            raise CurateError(f"unreadable shard table {path}: run `vlp data embed` again to recompute it")
        shard = str(t.pop("shard"))
        write_table(path.with_suffix(PARQUET), shard, t)
        path.unlink()
        log(f"{path.name} -> {path.with_suffix(PARQUET).name} ({i + 1}/{len(files)})")
    return len(files)


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True, help="the --out folder of `vlp data embed`")
    a = p.parse_args(argv)
    try:
        n = convert(a.embeddings, log=lambda m: print(m, file=sys.stderr))
    except CurateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {n} tables in {a.embeddings} to Parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
