"""Every flag of open_clip_train's params.py is a vlp flag or alias, or is answered with vlp's equivalent or
'not supported' (with why): never argparse's bare "unrecognized arguments". The flags are read from the
installed open_clip_train's own source, so a flag it adds shows up here."""
from __future__ import annotations

import ast
import inspect

import open_clip_train.params
import pytest

from vlp.config import ConfigError, build_parser, parse_config
from vlp.open_clip_flags import OPEN_CLIP_ANSWERS


def _open_clip_flags() -> list[str]:
    tree = ast.parse(inspect.getsource(open_clip_train.params))
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return sorted(flags)


OPEN_CLIP = _open_clip_flags()
VLP = {s for a in build_parser()._actions for s in a.option_strings}


def test_params_py_was_read():
    assert len(OPEN_CLIP) > 80 and "--lock-image-unlocked-groups" in OPEN_CLIP


@pytest.mark.parametrize("flag", OPEN_CLIP)
def test_open_clip_flag_is_known_or_answered(flag):
    try:
        parse_config([flag, "1"])
        return                                   # a vlp flag taking this value
    except ConfigError as e:
        message = str(e)
    assert "unrecognized arguments" not in message, message
    if flag in OPEN_CLIP_ANSWERS:
        assert message.startswith(f"{flag} is open_clip's; in vlp: {OPEN_CLIP_ANSWERS[flag]}"), message
    else:
        assert flag in VLP, message              # a vlp flag or alias that refused the value "1" in one line


def test_every_answer_is_for_an_open_clip_flag():
    assert set(OPEN_CLIP_ANSWERS) <= set(OPEN_CLIP), set(OPEN_CLIP_ANSWERS) - set(OPEN_CLIP)


def test_answers_of_several_flags_come_in_one_line():
    with pytest.raises(ConfigError) as e:
        parse_config(["--lock-image-unlocked-groups", "1", "--horovod", "--bogus-flag"])
    message = str(e.value)
    assert "--lock-image-unlocked-groups is open_clip's; in vlp: not supported" in message
    assert "--horovod is open_clip's; in vlp: not supported" in message
    assert "unrecognized arguments: --bogus-flag" in message and "\n" not in message
