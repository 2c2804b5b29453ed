"""Every vlp command names an unknown flag first, with its close match, and only then what is missing: argparse
alone stops at the first missing required argument (`vlp eval --bogus-flag 1` said only that --data is required)."""
from __future__ import annotations

import pytest

from vlp import cli


def _leaves(table, path=()):
    for name, (target, _) in table.items():
        if isinstance(target, dict):
            yield from _leaves(target, path + (name,))
        else:
            yield path + (name,)


COMMANDS = sorted(_leaves(cli.COMMANDS))


def _vlp(argv) -> int:
    """`vlp ARGV`'s exit status (a tool's argparse error leaves by SystemExit, as `python -m vlp` does)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_unknown_flag_is_named_first(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = _vlp([*command, "--bogus-flag", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: unrecognized arguments: --bogus-flag"), err
    assert not list(tmp_path.iterdir()), f"vlp {' '.join(command)} wrote {list(tmp_path.iterdir())} for a bad flag"


@pytest.mark.parametrize("argv, close, missing", [
    (["eval", "--datset", "x"], "--dataset", "--data/--dataset"),
    (["data", "make-shards", "--inptu", "t.csv"], "--input", "--input, --output/--out"),
    (["data", "filter", "--embedings", "e"], "--embeddings", "--embeddings, --out"),
    (["data", "inspect", "--shwo=3"], "--show", "shards"),
])
def test_close_match_then_missing(argv, close, missing, capsys):
    assert _vlp(argv) == 2
    err = capsys.readouterr().err.strip()
    first, _, rest = err.partition("; ")
    flag = next(a for a in argv if a.startswith("--")).split("=")[0]
    assert first == f"error: unrecognized arguments: {flag} (did you mean {close}?)", err
    assert rest.startswith(f"the following arguments are required: {missing}"), err


def test_missing_alone_is_still_argparse_message(capsys):
    assert _vlp(["data", "filter"]) == 2
    assert "the following arguments are required: --embeddings, --out" in capsys.readouterr().err
