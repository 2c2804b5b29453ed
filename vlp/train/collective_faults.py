"""A collective that failed because of a peer, worded: which collective, from where, what to do next.

gloo raises `RuntimeError: [gloo] Timed out waiting 30000ms for recv operation` in each rank that waited longer
than `--dist-timeout` for a stalled peer (stopped, swapping, hung in I/O); NCCL's watchdog names a `WorkNCCL(...
OpType=ALLREDUCE ... Timeout(ms)=...)`. Neither says which of the run's collectives it was, and nothing after it can
use the group, so the last saved checkpoint is the state to go back to. `PeerFault` carries the run's exit code 2
and a `reason` recorded in status.json, so a requeue script (or torchrun `--max-restarts`) can tell it from an
error to fix.
"""
from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import Optional

from vlp.train.health import TrainingError

_TIMEOUT = re.compile(r"timed out|timeout", re.I)
_NCCL_OP = re.compile(r"OpType=(\w+)")
_PACKAGE = Path(__file__).resolve().parents[1]   # vlp/


class PeerFault(TrainingError):
    """Another rank stopped answering (timed out) or ended (lost); `reason` goes into status.json."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def timed_out(error: BaseException, timeout: Optional[float]) -> Optional[str]:
    """'collective all_reduce (vlp.distributed.reduce_mean) timed out after 30 s (--dist-timeout): ...' if `error` is
    a collective's timeout, else None. Named by the torch.distributed call vlp made (or DDP's gradient all_reduce in
    backward, or NCCL's OpType) and the innermost vlp function that waited."""
    if not isinstance(error, RuntimeError) or not _TIMEOUT.search(str(error)):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    ours = [i for i, f in enumerate(frames) if Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    after = frames[ours[-1] + 1:] if ours else frames
    api = [f.name for f in after if f.filename.endswith("distributed_c10d.py")]
    nccl = _NCCL_OP.search(str(error))
    if api:
        op = f"collective {api[0]}"
    elif nccl:
        op = f"collective {nccl.group(1).lower()}"
    elif any(f.name == "backward" for f in after):
        op = "DDP's gradient all_reduce"   # launched by the reducer's hooks inside backward
    else:
        op = "a collective"
    where = ""
    if ours:
        f = frames[ours[-1]]
        module = ".".join(Path(f.filename).resolve().relative_to(_PACKAGE.parent).with_suffix("").parts)
        where = f" ({module}.{f.name})"
    limit = f"{timeout:g} s (--dist-timeout)" if timeout else "the process group's timeout"
    return f"{op}{where} timed out after {limit}: another rank stopped answering"
