"""Per-rank peak memory of the contrastive losses across 1, 2 and 4 gloo processes: gathered vs memory-flat.

    .venv/bin/python benchmarks/loss_memory.py                       # local batch 4096, dim 32 (issue #10)
    .venv/bin/python benchmarks/loss_memory.py --batch 1024 --worlds 1 2

Each rank holds a fixed local batch of B image/text features (L2-normalised, dim D) and runs the
forward and backward of `vlp.losses.build_loss` exactly as training does, for
  siglip           --loss siglip
  clip-local       --loss clip --local-loss --gather-with-grad
each with the gathered path (`--loss-chunk-size 0`: all B x W*B logits held, the code before the
memory-flat losses) and the memory-flat one (default `--loss-chunk-size`), in the same run.

Two figures per rank, the largest rank reported:
  alloc   peak of the bytes held by tensors allocated during the loss's forward and backward,
          counted exactly at every tensor operation (`AllocationPeak`, a TorchDispatchMode that
          follows each new storage until it is freed); inputs made before are not counted.
  rss     the process's peak resident set growth over the same call (Linux VmHWM, reset just
          before): what the allocator really took from the system, noisier.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CASES = {
    "siglip": dict(loss="siglip"),
    "clip-local": dict(loss="clip", local_loss=True, gather_with_grad=True),
}


class AllocationPeak(TorchDispatchMode):
    """Live bytes of the storages created by tensor operations while active, and their peak.

    A storage is counted when an operation returns a tensor on a storage none of its inputs had
    (a new allocation, not a view or an in-place result) and uncounted when it is freed."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # nothing here is compiled; saves importing torch._dynamo (seconds)
        return False

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self._tracked:
                    self._tracked.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def loss_peak(loss_kwargs: dict, rank: int, world: int, batch: int, dim: int, seed: int = 0) -> dict:
    """Forward + backward of rank `rank`'s loss on a fixed random local batch: {"alloc", "rss"} in bytes."""
    from vlp.config import LossConfig
    from vlp.losses import build_loss

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x_img = torch.randn(batch, dim, generator=g).requires_grad_()
    x_txt = torch.randn(batch, dim, generator=g).requires_grad_()
    scale = torch.tensor(2.3).requires_grad_()
    bias = torch.tensor(-10.0).requires_grad_() if loss_kwargs["loss"] == "siglip" else None
    image, text = F.normalize(x_img, dim=-1), F.normalize(x_txt, dim=-1)
    loss_fn = build_loss(LossConfig(**loss_kwargs), rank=rank, world_size=world)

    def run():
        out = loss_fn(image, text, scale.exp(), bias)
        out["loss"].backward(retain_graph=True)  # keep the normalisation graph for the next call
        del out

    with AllocationPeak():  # warm-up: communication buffers, thread pools, the tracker's own imports
        run()
    rss_ok = _reset_peak_rss()
    rss0 = _vm_kb("VmRSS")
    with AllocationPeak() as tracker:
        run()
    rss = (_vm_kb("VmHWM") - rss0) * 1024 if rss_ok else float("nan")
    return {"alloc": tracker.peak, "rss": rss}


def _worker(rank, world, init_file, out_dir, cases, batch, dim, threads):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {name: loss_peak(kw, rank, world, batch, dim) for name, kw in cases.items()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def measure(cases: dict, world: int, batch: int, dim: int, threads: int = 1) -> list[dict]:
    """Each rank's {case: {"alloc", "rss"}}, from `world` real gloo processes (spawned)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), tmp, cases, batch, dim, threads),
                           nprocs=world, join=True, start_method="spawn")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096, help="local batch per rank")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--chunk", type=int, default=None, help="--loss-chunk-size of the memory-flat path (default: vlp's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)
    chunk = {} if args.chunk is None else {"loss_chunk_size": args.chunk}
    cases = {}
    for name, kw in CASES.items():
        cases[f"{name} gathered"] = {**kw, "loss_chunk_size": 0}
        cases[f"{name} flat"] = {**kw, **chunk}
    peaks = {}
    for world in args.worlds:
        ranks = measure(cases, world, args.batch, args.dim, args.threads)
        for name in cases:
            peaks[name, world] = {k: max(r[name][k] for r in ranks) for k in ("alloc", "rss")}
    mb = 2 ** 20
    print(f"per-rank peak of loss forward+backward, local batch {args.batch}, dim {args.dim}, "
          f"{args.threads} thread(s)/process; MiB (largest rank)")
    head = "".join(f"  W={w:<2} alloc / rss  " for w in args.worlds)
    print(f"{'case':<22}{head}  W={args.worlds[-1]}/W={args.worlds[0]} (alloc)")
    for name in cases:
        cells = "".join(f"  {peaks[name, w]['alloc'] / mb:8.1f} / {peaks[name, w]['rss'] / mb:6.0f}"
                        for w in args.worlds)
        growth = peaks[name, args.worlds[-1]]["alloc"] / peaks[name, args.worlds[0]]["alloc"]
        print(f"{name:<22}{cells}  {growth:8.2f}x")
    for base in CASES:
        w = args.worlds[-1]
        ratio = peaks[f"{base} gathered", w]["alloc"] / peaks[f"{base} flat", w]["alloc"]
        print(f"{base}: gathered / flat at W={w}: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
