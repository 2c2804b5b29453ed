"""The default model on a CPU: `vlp train` without --model trains open_clip's ViT-B-32, about a minute a step on
a 2-core machine, and said nothing for ten minutes. On the CPU the run now says so when it starts, and again with
the first step's measured time and what the whole run would take, naming --model vlp-tiny for a try-out.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from vlp.config import ModelConfig

DEFAULT_MODEL = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "model")
TRY_OUT = "--model vlp-tiny for a try-out"


class DefaultModelOnCpu:
    """The two notices, or none: only for the default model on a CPU device."""

    def __init__(self, model: str, device, parameters: int):
        self.active = model == DEFAULT_MODEL and str(device).startswith("cpu")
        self.model, self.parameters = model, parameters

    def at_start(self) -> Optional[str]:
        if not self.active:
            return None
        return (f"note: no --model given, so this trains {self.model} ({self.parameters / 1e6:.1f}M parameters) on "
                f"the CPU, which takes on the order of a minute a step; {TRY_OUT}")

    def after_first_step(self, seconds: float, steps_left: int) -> Optional[str]:
        if not self.active:
            return None
        return (f"note: the first step of {self.model} on the CPU took {seconds:.{1 if seconds >= 1 else 3}f} s; the "
                f"{steps_left} step(s) of this run would take about {_duration(seconds * steps_left)}; {TRY_OUT}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
