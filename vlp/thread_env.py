"""OMP_NUM_THREADS checked before torch is imported: libgomp reads it when torch loads, warns about a value it
cannot use ("libgomp: Invalid value for environment variable OMP_NUM_THREADS", once per process) and torch then
runs on its own default, while vlp's thread rule (vlp/train/threads.py) saw the variable set and credited it.
A value that is not a positive whole number (or libgomp's comma list of them, "4,2") is taken out of the
environment with one line, so libgomp says nothing and the automatic thread count applies. Torch-free.
"""
from __future__ import annotations

import os
import re
import sys
from typing import MutableMapping, Optional

VALID = re.compile(r"\s*[1-9]\d*(\s*,\s*[1-9]\d*)*\s*")


def drop_invalid_omp(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Remove an unusable OMP_NUM_THREADS from `environ`; the one-line notice, or None when there is none."""
    value = environ.get("OMP_NUM_THREADS")
    if value is None or VALID.fullmatch(value):
        return None
    del environ["OMP_NUM_THREADS"]
    return f"warning: OMP_NUM_THREADS={value!r} is not a positive whole number: ignored, the automatic thread count is used"


def check_omp_env() -> None:
    """`drop_invalid_omp` on this process's environment, its notice printed once (by the first process)."""
    notice = drop_invalid_omp()
    if notice and os.environ.get("RANK", "0") == "0":
        print(notice, file=sys.stderr)
