"""Command-line flags that users bring from other tools (open_clip, CLIP_benchmark) or mistype: answered in one
line that names every such flag at once, with vlp's equivalent or the close flag it probably meant.

`Answer` is an argparse action for a flag vlp spells differently: it records the flag and its answer
instead of stopping at the first one; `check(parser, argv, error)` parses, then raises `error` once with
every answer, every unknown flag and a suggestion for each mistyped one (`--batch-szie` -> `--batch-size`).
"""
from __future__ import annotations

import argparse
import difflib
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


def check(parser: argparse.ArgumentParser, argv, error: type[Exception]) -> argparse.Namespace:
    """parse_known_args, then one `error` naming every answered and every unknown flag (or the namespace)."""
    parser.error = lambda message: (_ for _ in ()).throw(error(message))  # type: ignore[assignment]
    ns, extras = parser.parse_known_args(argv)
    problems = list(vars(ns).pop(ANSWERS, []))
    unknown = [a for a in extras if a.startswith("-") and a != "-"]
    if unknown:
        named = [f.split("=", 1)[0] + (f" (did you mean {c}?)" if (c := suggestion(parser, f)) else "") for f in unknown]
        problems.append("unrecognized arguments: " + ", ".join(named))
    stray = [a for a in extras if not (a.startswith("-") and a != "-")]
    if stray and not unknown:
        problems.append(f"unexpected argument(s): {' '.join(stray)}")
    if problems:
        raise error("; ".join(problems))
    return ns
