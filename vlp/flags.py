"""Command-line flags that users bring from other tools (open_clip, CLIP_benchmark) or mistype: answered in one
line that names every such flag at once, with vlp's equivalent or the close flag it probably meant.

`Answer` is an argparse action for a flag vlp spells differently: it records the flag and its answer
instead of stopping at the first one; `parse(parser, argv)` (every vlp parser is a `Parser`, whose
`parse_args` is it) reports every answer, every unknown flag with a suggestion for each mistyped one
(`--batch-szie` -> `--batch-size`) and then what is missing, in one error: argparse alone stops at the first
missing required argument, so `vlp eval --bogus 1` said only "the following arguments are required: --data".
`check(parser, argv, error)` is `parse` raising `error` instead of exiting.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
from typing import Optional

ANSWERS = "_answers"


class Answer(argparse.Action):
    """A flag vlp answers with its own equivalent: recorded, reported with the others after parsing."""

    def __init__(self, option_strings, dest, answer: str = "", nargs="*", **kw):
        self.answer = answer
        super().__init__(option_strings, dest, nargs=nargs, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        answers = getattr(namespace, ANSWERS, [])
        answers.append(f"{option_string} is {self.answer}")
        setattr(namespace, ANSWERS, answers)


def suggestion(parser: argparse.ArgumentParser, flag: str) -> Optional[str]:
    """The parser's flag closest to a mistyped one (None if nothing is close)."""
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(flag.split("=", 1)[0], known, n=1, cutoff=0.8)
    return close[0] if close else None


class Parser(argparse.ArgumentParser):
    """argparse whose errors name unknown flags first (with close matches), then missing arguments."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return parse(self, args, namespace)


@contextlib.contextmanager
def _nothing_required(parser: argparse.ArgumentParser):
    """Parse without argparse's required-argument check (it would stop before the unknown flags are seen)."""
    saved = [(a, a.required) for a in parser._actions] + [(g, g.required) for g in parser._mutually_exclusive_groups]
    for thing, _ in saved:
        thing.required = False
    try:
        yield [a for a, req in saved if req and isinstance(a, argparse.Action)]
    finally:
        for thing, req in saved:
            thing.required = req


def _missing(required: list, argv: list[str], ns: argparse.Namespace) -> list[str]:
    """The required arguments the command line leaves out (a flag not given, a positional left empty)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    out = []
    for a in required:
        absent = not set(a.option_strings) & given if a.option_strings else getattr(ns, a.dest, None) in (None, [])
        if absent:
            out.append(argparse._get_action_name(a) or a.dest)
    return out


def parse(parser: argparse.ArgumentParser, argv, namespace=None) -> argparse.Namespace:
    """One `parser.error` naming every answered and unknown flag, then the missing ones; else the namespace."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with _nothing_required(parser) as required:
        ns, extras = argparse.ArgumentParser.parse_known_args(parser, argv, argparse.Namespace(**(vars(namespace) if namespace else {})))
    problems = list(vars(ns).pop(ANSWERS, []))
    unknown = [a for a in extras if a.startswith("-") and a != "-"]
    if unknown:
        named = [f.split("=", 1)[0] + (f" (did you mean {c}?)" if (c := suggestion(parser, f)) else "") for f in unknown]
        problems.append("unrecognized arguments: " + ", ".join(named))
    stray = [a for a in extras if not (a.startswith("-") and a != "-")]
    if stray and not unknown:
        problems.append(f"unexpected argument(s): {' '.join(stray)}")
    if problems:
        missing = _missing(required, argv, ns)
        if missing:
            problems.append("the following arguments are required: " + ", ".join(missing))
        parser.error("; ".join(problems))
    return argparse.ArgumentParser.parse_args(parser, argv, namespace)


def check(parser: argparse.ArgumentParser, argv, error: type[Exception]) -> argparse.Namespace:
    """`parse`, raising one `error` instead of exiting."""
    parser.error = lambda message: (_ for _ in ()).throw(error(message))  # type: ignore[assignment]
    return parse(parser, argv)
