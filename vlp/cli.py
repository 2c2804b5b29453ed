"""The `vlp` command (also `python -m vlp`): one entry point whose subcommands forward to each tool's main.

A subcommand is one row of COMMANDS: name -> (target, one-line help). The target is "module:function",
a function taking the remaining arguments as a list and returning an exit status (None means 0), or
another table of the same shape for a group (`vlp data make_shards ...`). Modules are imported only
when their subcommand runs, so `vlp env` answers even where torch or open_clip is broken.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Union

Table = dict[str, tuple[Union[str, "Table"], str]]

COMMANDS: Table = {
    "env": ("vlp.env:main", "environment report for bug reports: vlp, Python, torch/CUDA/NCCL, devices, packages"),
    "train": ("vlp.cli:train", "train a dual encoder (train.py): flags as in open_clip"),
    "eval": ("vlp.cli:evaluate", "zero-shot, retrieval and geometry figures (eval_zeroshot.py), CLIP_benchmark's flags"),
    "export-hf": ("vlp.hf_export:main", "a checkpoint or export as a transformers CLIPModel + processor folder"),
    "demo": ("vlp.demo:main", "make the demo data, train vlp-tiny on CPU, print the held-out figures"),
    "data": ({
        "make-shards": ("data_tools.make_shards:main", "image+caption table or folder -> webdataset shards"),
        "inspect": ("data_tools.inspect_shards:main", "check shards; --show N samples, --contact-sheet FILE.png"),
        "rewrite-captions": ("data_tools.rewrite_captions:main", "LaCLIP caption rewrites with a local LLM or rules"),
        "add-rewrites": ("data_tools.add_rewrites:main", "copy shards with rewrites added to each sample's .json"),
        "train-tokenizer": ("data_tools.train_tokenizer:main", "sentencepiece tokenizer + matching model config"),
        "make-demo-data": ("data_tools.make_demo_data:main", "the demo's procedural shapes data"),
        "make-icon-bench": ("data_tools.make_icon_bench:main", "the icon learning benchmark (offline)"),
        "make-glyph-bench": ("data_tools.make_glyph_bench:main", "the glyph learning benchmark (fonts; offline)"),
        "embed": ("vlp.curate.embed:main", "image/text embeddings + CLIP score per shard (torchrun splits shards)"),
        "filter": ("vlp.curate.filter:main", "counted curation rules over embed's tables -> decisions.tsv + report"),
        "reshard": ("vlp.curate.reshard:main", "the kept samples of decisions.tsv as new shards (atomic, sizes.json)"),
        "convert-tables": ("vlp.curate.convert:main", "rewrite a folder's .npz embed tables as Parquet tables"),
        "make-noisy-pool": ("data_tools.make_noisy_pool:main", "clean shards + mismatched, near-dup, boilerplate"),
    }, "data tools (vlp data COMMAND --help)"),
}


def _repo_script(name: str, argv: list[str]) -> int:
    """Run `main(argv)` of one of the CLI scripts beside the package (train.py, eval_zeroshot.py)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / name
    spec = importlib.util.spec_from_file_location(f"vlp_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def train(argv: list[str]) -> int:
    return _repo_script("train.py", argv)


def evaluate(argv: list[str]) -> int:
    return _repo_script("eval_zeroshot.py", argv)


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
        print(f"error: unknown command {name!r} for {prog} (commands: {', '.join(table)})", file=sys.stderr)
        return 2
    target = table[name][0]
    sub_prog = f"{prog} {name}"
    if isinstance(target, dict):
        return dispatch(target, rest, sub_prog)
    saved, saved_error = sys.argv[0], argparse.ArgumentParser.error
    sys.argv[0] = sub_prog  # argparse's default prog, so `vlp env --help` says "usage: vlp env"
    argparse.ArgumentParser.error = _one_line_error   # every tool's bad flag: `error: ...`, as train's and eval's
    try:
        rc = resolve(target)(rest)
    finally:
        sys.argv[0], argparse.ArgumentParser.error = saved, saved_error
    return 0 if rc is None else int(rc)


def _one_line_error(parser: argparse.ArgumentParser, message: str):
    """argparse's error, as one line with vlp's prefix instead of a usage block."""
    print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from vlp.thread_env import check_omp_env

    check_omp_env()   # before any command imports torch
    if argv[:1] == ["--version"]:
        from vlp import __version__

        print(f"vlp {__version__}")
        return 0
    return dispatch(COMMANDS, argv, "vlp")
