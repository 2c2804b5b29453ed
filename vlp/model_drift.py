"""What a resumed run changes in the model config its checkpoint was trained with.

A changed `vision_cfg.head_width` or `text_cfg.heads` keeps every tensor's shape, so the weights load and the
run goes on as another model than the one trained. `drift(stored, requested)` names each field that differs,
for the resume to refuse (unless --allow-model-change); pure, so it serves any checkpoint format that stores
the model config (as every vlp checkpoint does, `model_cfg`).
"""
from __future__ import annotations

import json
from typing import Any, Union

_ABSENT = object()


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def drift(stored: Union[str, dict], requested: Union[str, dict]) -> list[str]:
    """'path old -> new' for each model config field that differs (JSON strings or dicts), sorted by path."""
    a = _leaves(json.loads(stored) if isinstance(stored, str) else stored)
    b = _leaves(json.loads(requested) if isinstance(requested, str) else requested)
    show = lambda v: "absent" if v is _ABSENT else json.dumps(v)  # noqa: E731
    return [f"{k} {show(a.get(k, _ABSENT))} -> {show(b.get(k, _ABSENT))}"
            for k in sorted(a.keys() | b.keys()) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def refusal(path: str, changes: list[str]) -> str:
    """The one line a resume that changes the model says."""
    return (f"{path} was trained with another model config ({', '.join(changes)}): resume with the run's own "
            f"--model, or pass --allow-model-change if the change is meant")
