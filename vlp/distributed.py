"""The one place (besides accelerate) that talks to torch.distributed.

Everything here is a no-op, or the identity, when no process group is initialised, so
single-process code calls it unconditionally.
"""
from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed

try:
    import torch.distributed.nn  # noqa: F401 - autograd-aware collectives (torch.distributed.nn.all_gather)
except ImportError:  # builds without distributed support: everything below is a no-op there
    pass


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when there is none."""
    if not is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0; the backward sums the incoming gradients
    over ranks and hands each rank the slice of its own input (reduce-scatter)."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    with warnings.catch_warnings():  # deprecated in favour of a private API; still the autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(torch.distributed.nn.all_gather(tensor), dim=0)


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks; the backward sums the incoming gradients over ranks likewise."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    return torch.distributed.nn.all_reduce(tensor)


def all_gather_no_grad(tensor: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 without communicating gradients; the local
    tensor is put back into its own slot, so the gradient w.r.t. the local rows survives."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank() if rank is None else rank
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.detach().contiguous())
    parts[rank] = tensor
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    gather_with_grad: bool = False,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' features, rank-major (rows `rank*B .. rank*B+B-1` are rank `rank`'s).

    `gather_with_grad`: autograd-aware all_gather (gradients of every rank's loss reach every
    rank's features). Otherwise a plain all_gather with the local tensors put back into their own
    slot, so only the local rank's loss reaches the local features. Every rank must pass the same
    batch size. Identity when not distributed.
    """
    if world_size is None or rank is None:
        r, w = world_info()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size == 1 or not is_initialized():
        return image_features, text_features
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    return all_gather_no_grad(image_features, rank), all_gather_no_grad(text_features, rank)


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over ranks, for logging; the tensor itself when not distributed."""
    tensor = tensor.detach()
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    out = tensor.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out / torch.distributed.get_world_size()


def gather_objects(obj) -> list:
    """`obj` (picklable) from every rank, in rank order; `[obj]` when not distributed."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


MAIN_WORK_TIMEOUT = timedelta(hours=2)
_main_work_group: dict = {}   # default group -> its companion CPU group for waits on the main process


def wait_for_main(timeout: timedelta = MAIN_WORK_TIMEOUT) -> None:
    """Barrier behind work the main process does alone (an export, eval metrics such as a probe search).

    It waits on a CPU (gloo) group of its own whose timeout is `timeout`, not the collective timeout of the
    default group (`--dist-timeout`; NCCL's default 10 min), so a slow file system or a large probe on rank 0
    does not abort the job. Every rank must call it at the same points (the group is made on first use)."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return
    torch.distributed.barrier(group=main_work_group(timeout))


def main_work_group(timeout: timedelta = MAIN_WORK_TIMEOUT):
    """The CPU (gloo) group of every rank that waits on the main process's own work (see `wait_for_main`); made
    on first use (every rank must call it at the same point); None without a process group."""
    if not is_initialized():
        return None
    default = torch.distributed.distributed_c10d._get_default_group()
    group = _main_work_group.get(default)
    if group is None:
        _main_work_group.clear()
        group = _main_work_group[default] = torch.distributed.new_group(backend="gloo", timeout=timeout)
    return group


def cpu_group(timeout: timedelta = MAIN_WORK_TIMEOUT):
    """A new CPU (gloo) group of every rank with its own timeout (collective: every rank calls it), for work
    that runs beside the training's collectives (background checkpoint writes); None without a process group."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=timeout)


def init_restarted_group(timeout: Optional[timedelta], env: Optional[dict] = None) -> bool:
    """Under a torchrun restart (`--max-restarts`), open the default process group on keys of this attempt only.

    torchrun's static rendezvous (its default, single-node `--nproc_per_node N`) keeps one agent store for every
    attempt and the ranks' `env://` rendezvous adds no attempt prefix, so a restarted rank could read the address
    a rank of the previous, dead group left there and time out connecting to it (gloo `connectFullMesh ...
    Connection refused`; about half the restarts on a loaded 2-core machine). On one node every rank of an
    attempt has the same TORCHELASTIC_RESTART_COUNT, so it prefixes the keys; accelerate then uses this group.
    Multi-node restarts should use `--rdzv-backend c10d` (docs/reliability.md). True when it opened the group."""
    env = os.environ if env is None else env
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if (is_initialized() or not attempt or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or env.get("LOCAL_WORLD_SIZE") != env.get("WORLD_SIZE")):
        return False
    dist = torch.distributed
    timeout = timeout or timedelta(minutes=10)
    world = int(env["WORLD_SIZE"])
    store = dist.PrefixStore(f"vlp/attempt_{attempt}",
                             dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                                           timeout=timeout))
    dist.init_process_group(None if torch.cuda.is_available() else "gloo", store=store, rank=int(env["RANK"]),
                            world_size=world, timeout=timeout)
    return True


def single_process_launch_error(env: dict, launcher_argv: list[str]) -> Optional[str]:
    """A line when `accelerate launch --num_processes N` (N > 1) started this as its only process.

    On a machine without GPUs accelerate's launcher without `--multi_gpu` (or a config file saying so) runs
    the script once, and nothing tells the script that N were asked. `launcher_argv`: the parent process's
    command line."""
    if "WORLD_SIZE" in env or "ACCELERATE_USE_CPU" not in env:  # torchrun/multi-process, or not accelerate's
        return None
    if not any(os.path.basename(a).startswith("accelerate") for a in launcher_argv[:3]):
        return None
    wanted = None
    for i, arg in enumerate(launcher_argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(launcher_argv):
                wanted = launcher_argv[i + 1]
            elif arg.startswith(flag + "="):
                wanted = arg.split("=", 1)[1]
    if wanted is None or not wanted.isdigit() or int(wanted) < 2:
        return None
    return (f"accelerate launch started 1 process, not {wanted}: without GPUs it starts several only with "
            f"--multi_gpu (accelerate launch --multi_gpu --num_processes {wanted} train.py ...), "
            f"or use torchrun --nproc_per_node {wanted} train.py ...")


def parent_argv() -> list[str]:
    """The parent process's command line (Linux /proc; empty elsewhere)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0, in rank order, 2-d tensors whose row counts differ between ranks (no grad).

    A rank with no rows may pass an empty tensor of any width. Each rank's rows are padded to the largest
    count for the collective and trimmed after. On NCCL the exchange goes through the current CUDA device."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    world = torch.distributed.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    shape = torch.tensor([tensor.shape[0], tensor.shape[1] if tensor.dim() > 1 and tensor.shape[0] else 0],
                         device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    pad = torch.zeros(max(rows), width, dtype=tensor.dtype, device=dev)
    if rows[torch.distributed.get_rank()]:
        pad[:tensor.shape[0]] = tensor.detach().to(dev)
    parts = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(parts, pad)
    return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(tensor.device)


class RingShift:
    """Send tensors to rank+1 and receive same-shaped ones from rank-1, asynchronously.

    `RingShift(tensors, rank, world, tag).wait()` -> the received tensors. Several shifts may be in
    flight at once when they use distinct tags. With one process the tensors come back unchanged.
    Not autograd-aware: the memory-flat losses (vlp/loss_blocks.py) route gradients themselves."""

    def __init__(self, tensors: list[torch.Tensor], rank: int, world_size: int, tag: int = 0):
        if world_size == 1:
            self.received, self.requests = tensors, []
            return
        nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
        self.sent = [t.contiguous() for t in tensors]  # kept alive until wait()
        self.received = [torch.empty_like(t) for t in self.sent]
        P2POp = torch.distributed.P2POp
        ops = [P2POp(torch.distributed.isend, t, nxt, tag=tag) for t in self.sent]
        ops += [P2POp(torch.distributed.irecv, r, prv, tag=tag) for r in self.received]
        self.requests = torch.distributed.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        return self.received


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP-style (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting:
    the same parameters, whose state dict keys carry no `module.`/`_orig_mod.` prefix (what is saved, evaluated,
    clamped). An FSDP2 module is its own plain module (fully_shard changes the class in place)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


_HOST_GROUP = None


def host_group():
    """A process group for small host-side agreements that must not wait for the device (stop signals, whether
    every rank has more data): the default group when it is gloo already (CPU runs), else a gloo group made once.
    Collective the first time: every rank calls it at the same point. None without a process group."""
    global _HOST_GROUP
    if not is_initialized():
        return None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    if _HOST_GROUP is None:
        _HOST_GROUP = torch.distributed.new_group(backend="gloo")
    return _HOST_GROUP


def any_on_host(flags: list[bool]) -> list[bool]:
    """Each flag true on every rank when true on any, agreed over `host_group()`: no device work is waited for."""
    group = host_group()
    if group is None:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return [v > 0 for v in t.tolist()]
