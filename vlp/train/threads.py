"""How many intra-op threads torch gets on CPU, so that the model does not fight the loader for cores.

torch starts one intra-op thread per core; the loader's worker processes need cores too, and so do the
other training processes on the same machine. When they all spin at once every step waits for the
slowest thread (on 2 busy cores the default ran 7-9 samples/s, one thread 113). The rule:
`max(1, cores // local_processes - workers)`, where cores are those this process may run on.
An explicit `--threads N` or `OMP_NUM_THREADS` wins; on CUDA torch's default is kept.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pick_threads(cores: int, workers: int, local_processes: int = 1) -> int:
    return max(1, cores // max(1, local_processes) - workers)


def configure_threads(requested: Optional[int], workers: int, device, local_processes: int = 1) -> tuple[int, str]:
    """Set torch's intra-op threads for this process; returns (threads, why) for the banner."""
    if requested:
        torch.set_num_threads(requested)
        return requested, "--threads"
    if torch.device(device).type != "cpu":
        return torch.get_num_threads(), "torch default (CUDA run)"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = usable_cores()
    n = pick_threads(cores, workers, local_processes)
    torch.set_num_threads(n)
    return n, f"{cores} cores / {local_processes} process(es) - {workers} loader workers"
