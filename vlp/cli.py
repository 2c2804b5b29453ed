"""The `vlp` command (also `python -m vlp`): one entry point whose subcommands forward to each tool's main.

A subcommand is one row of COMMANDS: name -> (target, one-line help). The target is "module:function",
a function taking the remaining arguments as a list and returning an exit status (None means 0), or
another table of the same shape for a group (`vlp data make_shards ...`). Modules are imported only
when their subcommand runs, so `vlp env` answers even where torch or open_clip is broken.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Union

Table = dict[str, tuple[Union[str, "Table"], str]]

COMMANDS: Table = {
    "env": ("vlp.env:main", "environment report for bug reports: vlp, Python, torch/CUDA/NCCL, devices, packages"),
}


def usage(table: Table, prog: str) -> str:
    width = max(len(n) for n in table) + 2
    rows = "\n".join(f"  {name:<{width}}{help_}" for name, (_, help_) in table.items())
    return f"usage: {prog} COMMAND [ARGS...]   ({prog} COMMAND --help for its options)\n\ncommands:\n{rows}"


def resolve(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def dispatch(table: Table, argv: list[str], prog: str) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(table, prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown command {name!r} (commands: {', '.join(table)})", file=sys.stderr)
        return 2
    target = table[name][0]
    sub_prog = f"{prog} {name}"
    if isinstance(target, dict):
        return dispatch(target, rest, sub_prog)
    saved = sys.argv[0]
    sys.argv[0] = sub_prog  # argparse's default prog, so `vlp env --help` says "usage: vlp env"
    try:
        rc = resolve(target)(rest)
    finally:
        sys.argv[0] = saved
    return 0 if rc is None else int(rc)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        from vlp import __version__

        print(f"vlp {__version__}")
        return 0
    return dispatch(COMMANDS, argv, "vlp")
