"""Checkpoint save and load: bytes, seconds and peak memory of a full training state (model + AdamW).

    .venv/bin/python benchmarks/checkpoint_io.py                                   # vlp-tiny, 1 and 2 processes
    .venv/bin/python benchmarks/checkpoint_io.py --models ViT-B-16 ViT-L-14 --procs 1 2 --dir /big/disk

Each case runs in fresh processes (spawned; 2 processes talk over gloo, as `torchrun` on CPU). A model is built
from its open_clip config with random weights (nothing is downloaded), AdamW's moments are filled by one step,
and then vlp's own `Checkpointer` saves the same state with each writer, one after the other in the same
processes: `v1` (vlp's earlier writer: one main file + each rank's optimiser share), `dcp` (torch.distributed.
checkpoint, the loop waits: what a preemption save does) and `dcp-async` (DCP's async_save: the loop waits for
the copy to CPU memory only, the write and commit go on in the background). blocked s: until `save` returns (the
loop's stall; every rank enters together, the slowest rank counts); total s: until the checkpoint is committed on
every rank. Then `--resume latest` (`resolve_resume` + `restore`) into the same objects zeroed first: seconds,
each rank's peak resident memory above the level before (sampled every 5 ms) and whether every parameter and
optimiser state came back bit for bit. `--fsdp` shards model and optimiser with vlp's FSDP2 code first.

The peer, measured in the same run on rank 0: plain `torch.save` of the same state dict to a file in the same
folder (no checksum, no fsync, no rename): the floor of one writer. Figures depend on the disk and on what else
runs: the load average is printed with each row. ViT-L/14 needs ~5.5 GB of memory per process, ~11 GB with
dcp-async (the CPU copy).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loss_memory import _vm_kb  # noqa: E402 - one reader of /proc/self/status


class PeakMemory:
    """Peak VmRSS and RssAnon (bytes) while inside the block, sampled by a thread."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self.peak_anon = every, 0, 0

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _vm_kb("VmRSS") * 1024)
            self.peak_anon = max(self.peak_anon, _vm_kb("RssAnon") * 1024)
            self._done.wait(self.every)

    def __enter__(self):
        self.before, self.before_anon = _vm_kb("VmRSS") * 1024, _vm_kb("RssAnon") * 1024
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _vm_kb("VmRSS") * 1024)
        self.peak_anon = max(self.peak_anon, _vm_kb("RssAnon") * 1024)


class _Loader:
    """Stands in for the data loader: only its position is checkpointed."""

    def __init__(self, rank: int, world: int, workers: int):
        self.rank, self.world, self.workers = rank, world, workers

    def state_dict(self) -> dict:
        return {"epoch": 0, "batches_done": 1, "rank": self.rank, "world_size": self.world, "workers": self.workers,
                "worker_state": []}


def _build(model_name: str, fsdp: bool):
    import open_clip
    import torch

    from vlp.train import sharding

    torch.manual_seed(0)  # the same weights on every rank, as DDP keeps them
    model = open_clip.create_model(model_name, pretrained=None)  # random weights from the config
    if fsdp:
        model = sharding.shard_model(model, "full", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():  # one step fills AdamW's two moments (the bulk of a training state)
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler, open_clip.get_model_config(model_name)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _read_bytes() -> int:
    """Bytes this process has read with read() calls so far (/proc/self/io rchar; pages of a mapped file not
    counted: they come from the page cache, shared)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def _fingerprint(model, optimizer) -> str:
    """SHA-256 over every parameter's and optimiser state's bytes (this rank's shard under FSDP)."""
    import hashlib

    import torch

    sha = hashlib.sha256()
    params = list(model.parameters())
    tensors = [*params, *(optimizer.state[p][k] for p in params for k in sorted(optimizer.state.get(p, {}))
                          if isinstance(optimizer.state[p][k], torch.Tensor))]
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        sha.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
    return sha.hexdigest()


def _worker(rank: int, world: int, port: int, model_name: str, fsdp: bool, load: bool, folder: str, out: str,
            writers: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    from accelerate import Accelerator

    import vlp.models  # noqa: F401 - registers vlp's own model configs (vlp-tiny) with open_clip
    from vlp.config import Config
    from vlp.runtime import checkpoint as ckpt
    from vlp.train.checkpointer import Checkpointer

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    model, optimizer, scheduler, model_cfg = _build(model_name, fsdp)
    identity = {"model_name": model_name, "model_cfg": json.dumps(model_cfg), "tokenizer": None}
    ckpt_dir = Path(folder) / "checkpoints"
    cfg = Config()
    cfg.run.keep_checkpoints = 1
    position = _Loader(rank, world, max(1, cfg.data.workers))
    saver = Checkpointer(ckpt_dir, acc, model, optimizer, scheduler, position, cfg, identity)
    results = {}
    for step, writer in enumerate(writers, start=1):
        results[writer] = result = _save(saver, writer, step, world)
        if rank == 0:  # the checkpoint: its main file and what other ranks wrote beside it
            files = [p for p in sorted(ckpt_dir.iterdir()) if p.name.startswith(f"step_{step:08d}")]
            files += [q for p in files if p.is_dir() for q in p.iterdir()]
            result["files"] = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in files if p.is_file()}
            result["bytes"] = sum(result["files"].values())
        _barrier(world)
        if load:
            result.update(_load(acc, ckpt, Checkpointer(ckpt_dir, acc, model, optimizer, scheduler, position, cfg,
                                                        identity), model, optimizer, ckpt_dir, world))
    result = results
    if rank == 0 and not fsdp:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        plain = ckpt_dir / "plain.pt"
        t = time.perf_counter()
        torch.save(state, plain)
        result["peer_s"] = time.perf_counter() - t
        plain.unlink()
        del state
    saver.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _save(saver, writer: str, step: int, world: int) -> dict:
    """One save by `writer`: v1 (vlp's earlier writer), dcp (DCP, the loop waits), dcp-async (DCP's async_save:
    the loop waits for the staging only). blocked_s: until `save` returns on this rank; total_s: until the
    checkpoint is committed on every rank."""
    from vlp.train.checkpoint_v1 import save_v1

    _barrier(world)
    t0 = time.perf_counter()
    if writer == "v1":
        save_v1(saver, step, 0)
    else:
        saver.save(step, 0, background=writer == "dcp-async")
    blocked = time.perf_counter() - t0
    saver.saver.wait()
    _barrier(world)
    return {"blocked_s": blocked, "total_s": time.perf_counter() - t0}


def _load(acc, ckpt, loader, model, optimizer, ckpt_dir: Path, world: int) -> dict:
    """`--resume latest` into objects zeroed first: seconds, peak memory, bytes read, and whether every
    parameter and optimiser state came back bit for bit."""
    import torch

    saved = _fingerprint(model, optimizer)
    with torch.no_grad():
        for t in [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values())]:
            (t.to_local() if hasattr(t, "to_local") else t).zero_()
    _barrier(world)
    read0, t0 = _read_bytes(), time.perf_counter()
    with PeakMemory() as mem:
        loader.restore(ckpt.resolve_resume("latest", ckpt_dir))  # what `--resume latest` does, on every rank
    seconds, read = time.perf_counter() - t0, _read_bytes() - read0
    _barrier(world)
    return {"load_s": seconds, "load_all_s": time.perf_counter() - t0, "read_bytes": read,
            "rss_before": mem.before, "rss_peak": mem.peak, "anon_before": mem.before_anon, "anon_peak": mem.peak_anon,
            "exact": _fingerprint(model, optimizer) == saved}


WRITERS = ("v1", "dcp", "dcp-async")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_name: str, world: int, fsdp: bool, root: str, load: bool = True, writers=WRITERS) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=root) as folder, tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, _free_port(), model_name, fsdp, load, folder, out, list(writers)),
                           nprocs=world, join=True, start_method="spawn")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vlp-tiny"])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--writers", nargs="+", default=list(WRITERS), choices=WRITERS)
    p.add_argument("--fsdp", action="store_true", help="shard model and optimiser with FSDP2 (2+ processes)")
    p.add_argument("--dir", default=None, help="folder to write checkpoints in (default: the system temp folder)")
    p.add_argument("--no-load", action="store_true", help="time the saves only")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    gb, nan = 1e9, float("nan")
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    print(f"{'model':<9} {'procs':>5} {'writer':<9} {'files':>5} {'GB':>5} {'blocked s':>9} {'total s':>7} "
          f"{'torch.save s':>12} {'load s':>6} {'load RSS +GB':>12} {'exact':>5} {'loadavg':>7}")
    for name in args.models:
        for world in args.procs:
            if args.fsdp and world < 2:
                continue
            ranks = measure(name, world, args.fsdp, args.dir or tempfile.gettempdir(), load=not args.no_load,
                            writers=args.writers)
            peer = ranks[0].get("peer_s") or nan
            for writer in args.writers:
                per = [r[writer] for r in ranks]
                first = per[0]
                row = {"model": name, "procs": world, "fsdp": args.fsdp, "writer": writer, "files": first["files"],
                       "bytes": first["bytes"], "blocked_s": max(r["blocked_s"] for r in per),
                       "total_s": max(r["total_s"] for r in per), "peer_s": ranks[0].get("peer_s"),
                       "load_s": max(r.get("load_all_s", nan) for r in per),
                       "load_rss_increase": max(r.get("rss_peak", nan) - r.get("rss_before", 0) for r in per),
                       "exact": all(r.get("exact", False) for r in per) if "exact" in first else None,
                       "loadavg": os.getloadavg()[0], "ranks": per}
                rows.append(row)
                print(f"{name:<9} {world:>5} {writer:<9} {len(row['files']):>5} {row['bytes'] / gb:5.2f} "
                      f"{row['blocked_s']:9.2f} {row['total_s']:7.2f} {peer:12.2f} {row['load_s']:6.2f} "
                      f"{row['load_rss_increase'] / gb:12.2f} {str(row['exact']):>5} {row['loadavg']:7.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
