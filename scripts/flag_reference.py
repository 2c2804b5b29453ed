#!/usr/bin/env python
"""Write docs/flags.md, the flag reference, from the commands' own argparse parsers, so it cannot drift.

Every `vlp` command builds its parser inside its main; this script runs each main with argparse's parse
methods replaced by one that hands back the parser instead of parsing, then renders the parser's actions as
one table per command. tests/test_docs_site.py fails when the committed page differs from what this writes.

    .venv/bin/python scripts/flag_reference.py            # rewrite docs/flags.md
    .venv/bin/python scripts/flag_reference.py --check    # exit 1 if docs/flags.md is out of date
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "flags.md"
SKIP = {"demo"}   # its flags are train's, passed through after `--`; `vlp demo --help` lists its own few


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _capture(*args, **kwargs):
    raise _Captured(args[0])


def parser_of(target: str) -> argparse.ArgumentParser:
    """The parser the command's main builds (it is stopped at its first parse, before any work)."""
    from vlp.cli import resolve

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = _capture
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            resolve(target)([])
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise RuntimeError(f"{target} returned without parsing its arguments")


def commands() -> list[tuple[str, str, str]]:
    """(command line, target, one-line help) for every command with flags, in `vlp --help`'s order."""
    from vlp.cli import COMMANDS

    rows = []
    for name, (target, help_) in COMMANDS.items():
        if name in SKIP:
            continue
        if isinstance(target, dict):
            rows += [(f"vlp {name} {sub}", t, h) for sub, (t, h) in target.items()]
        else:
            rows.append((f"vlp {name}", target, help_))
    return rows


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS, [], ""):
        return ""
    home = str(Path.home())
    text = str(action.default)   # a default under the home folder reads as ~/..., the same on every machine
    return f"`{'~' + text[len(home):] if home != '/' and text.startswith(home + '/') else text}`"


def table(parser: argparse.ArgumentParser) -> str:
    """The parser's own flags; the flags of other tools it answers (vlp.flags.Answer) in a table of their own."""
    from vlp.flags import Answer

    formatter = parser._get_formatter()
    own = ["| flag | default | what it does |", "|---|---|---|"]
    answered = ["Flags of open_clip or CLIP_benchmark this command does not take; each is answered in one line "
                "naming vlp's way (exit 2):",
                "", "| flag | answer |", "|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.dest]
        flag = ", ".join(f"`{n}`" for n in names)
        what = formatter._expand_help(action) if action.help else ""
        if isinstance(action, Answer):
            answered.append(f"| {_cell(flag)} | {_cell(what.removeprefix('answered: '))} |")
            continue
        if action.option_strings and action.nargs != 0 and action.choices is None:
            flag += f" `{formatter._format_args(action, action.dest.upper())}`"
        if action.choices is not None:
            what = (what + " " if what else "") + "(one of: " + ", ".join(map(str, action.choices)) + ")"
        if action.required:
            what = "**required.** " + what
        own.append(f"| {_cell(flag)} | {_cell(_default(action))} | {_cell(what)} |")
    return "\n".join(own + ([""] + answered if len(answered) > 4 else []))


def render() -> str:
    sys.path.insert(0, str(ROOT))
    parts = ["# Flag reference", "",
             "Generated from the commands' own parsers by `scripts/flag_reference.py` (do not edit by hand; "
             "`tests/test_docs_site.py` fails when this page and the parsers disagree). `vlp COMMAND --help` "
             "prints the same flags. `train.py ARGS` is `vlp train ARGS`; `eval_zeroshot.py ARGS` is `vlp eval ARGS`.", ""]
    for line, target, help_ in commands():
        parts += [f"## {line}", "", _cell(help_) + ".", "", table(parser_of(target)), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if docs/flags.md differs from the parsers")
    check = args.parse_args(argv).check
    text = render()
    if check:
        if PAGE.exists() and PAGE.read_text() == text:
            return 0
        print(f"error: {PAGE.relative_to(ROOT)} is out of date: run `python scripts/flag_reference.py`", file=sys.stderr)
        return 1
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
