"""`--torchcompile` under DDP: `torch.compile(DDP(m))` against `DDP(torch.compile(m))` (what vlp runs), 2 gloo ranks.

    .venv/bin/python benchmarks/compile_ddp.py            # vlp-tiny, batch 32 per rank, CPU, 1 thread, 25 MB buckets
    .venv/bin/python benchmarks/compile_ddp.py --bucket-cap-mb 1 --reverse   # smaller buckets, the other order first

torch documents the first (dynamo's DDPOptimizer then splits the graph at DDP's bucket boundaries so each
bucket's all-reduce overlaps the rest of the backward). In this torch the second gets the same split: DDP marks
itself active around its call of the inner module, and dynamo applies DDPOptimizer to any frame compiled under
an active DDP. Both orders train the same weights on the same random batches (vlp's loss across the ranks,
AdamW); reported per order on rank 0: median step time, the first steps' compile time, and into how many bucket
subgraphs DDPOptimizer split the graph. On a CPU with gloo the all-reduce is CPU work too, so overlap gains
little here; which order is faster on GPUs (NCCL on its own stream) is for a GPU run to say.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ORDERS = ("compile(DDP(m))", "DDP(compile(m))")



def record_ddp_buckets() -> list[int]:
    """A list that receives, for each graph dynamo's DDPOptimizer splits, how many buckets (subgraphs) it made
    (read from its log)."""
    import logging
    import re

    buckets: list[int] = []

    class _Buckets(logging.Handler):
        def emit(self, record):
            m = re.search(r"created (\d+) buckets", record.getMessage())
            if m:
                buckets.append(int(m.group(1)))

    ddp_log = logging.getLogger("torch._dynamo.backends.distributed")
    ddp_log.setLevel(logging.INFO)
    ddp_log.addHandler(_Buckets())
    return buckets


def _rank(rank: int, world: int, init: str, a, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlp.config import LossConfig
    from vlp.losses import build_loss
    from vlp.models import create_model

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    base = create_model(a.model).model
    size = base.visual.image_size
    size = size if isinstance(size, int) else size[0]
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(a.batch_size, 3, size, size, generator=g),
                torch.randint(1, 1000, (a.batch_size, base.context_length), generator=g)) for _ in range(2)]
    loss_fn = build_loss(LossConfig(), rank=rank, world_size=world)
    results = {}
    buckets = record_ddp_buckets()
    for order in (ORDERS[::-1] if a.reverse else ORDERS):
        torch._dynamo.reset()
        buckets.clear()
        net = copy.deepcopy(base)
        if order == ORDERS[0]:
            model = torch.compile(DDP(net, bucket_cap_mb=a.bucket_cap_mb))
        else:
            model = DDP(torch.compile(net), bucket_cap_mb=a.bucket_cap_mb)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(i):
            out = model(*batches[i % 2])
            loss_fn(out["image_features"], out["text_features"], out["logit_scale"])["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for i in range(a.warmup):
            step(i)
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(a.steps):
            dist.barrier()
            t = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t)
        results[order] = {"step_ms": 1e3 * statistics.median(times), "compile_s": compile_s,
                          "split": sum(buckets)}
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.destroy_process_group()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vlp-tiny")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--threads", type=int, default=1, help="per rank")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket size (its default)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reverse", action="store_true", help="time DDP(compile(m)) first (the machine's load drifts)")
    a = p.parse_args(argv)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(2, os.path.join(tmp, "init"), a, tmp), nprocs=2, join=True,
                           start_method="spawn")
        results = torch.load(os.path.join(tmp, "results.pt"))
    print(f"{a.model}, batch {a.batch_size} per rank, 2 gloo ranks x {a.threads} thread(s), buckets "
          f"{a.bucket_cap_mb} MB, torch {torch.__version__}")
    for order, r in sorted(results.items()):
        print(f"{order:<16} median step {r['step_ms']:7.1f} ms, compile {r['compile_s']:5.1f} s, "
              f"graph split by DDPOptimizer into {r['split'] or 'no'} bucket subgraphs")
    return results


if __name__ == "__main__":
    main()
