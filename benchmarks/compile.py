"""`--torchcompile` against eager: vlp's own training step, same weights, batches and threads, same run.

    .venv/bin/python benchmarks/compile.py                        # vlp-tiny, batch 64, fp32, 1 thread
    .venv/bin/python benchmarks/compile.py --threads 2 --precision amp_bf16

Two `VlpRunner`s of benchmarks/train_step.py (`Trainer.step`, what `vlp.train.loop.train` drives), one
with `cfg.model.torchcompile` (the model wrapped in `torch.compile`, as the loop does), one without,
start from one state dict. Batches are random (images already float, as the CPU loader hands them
over): data loading is not timed. The compiled one's first steps (compilation) are reported apart;
then `--repeats` rounds of `--steps` steps of each, alternating which goes first. Reported: median
step time of each, the speed-up (eager / compiled) from wall time and from this process's CPU time
(robust to other processes' load with --threads 1), and the compile time.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from benchmarks.step_runners import VlpRunner, _Stream, time_pair


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vlp-tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (set explicitly)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compiled model compiles here)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from vlp.models import create_model

    torch.manual_seed(a.seed)
    bundle = create_model(a.model)
    state = copy.deepcopy(bundle.model.state_dict())
    size = bundle.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    ctx = bundle.model.context_length
    g = torch.Generator().manual_seed(a.seed)
    batches = [(torch.randn(a.batch_size, 3, size, size, generator=g),
                torch.randint(1, 1000, (a.batch_size, ctx), generator=g)) for _ in range(4)]
    total = a.warmup + a.repeats * a.steps + 1
    common = dict(batch_size=a.batch_size, accum_freq=1, precision=a.precision, total_steps=total,
                  device="cpu", seed=a.seed)
    eager = VlpRunner(a.model, state, compile_=False, **common)
    compiled = VlpRunner(a.model, state, compile_=True, **common)
    eager.name, compiled.name = "eager", "compiled"
    streams = {"eager": _Stream(batches), "compiled": _Stream(batches)}

    t0 = time.perf_counter()
    compiled.run(streams["compiled"], 1)
    compile_s = time.perf_counter() - t0
    times = time_pair([eager, compiled], streams, steps=a.steps, warmup=a.warmup, repeats=a.repeats)

    med = {k: statistics.median(v["step_s"]) for k, v in times.items()}
    cpu = {k: statistics.median(v["step_cpu_s"]) for k, v in times.items()}
    paired = statistics.median(e / c for e, c in zip(times["eager"]["round_s"], times["compiled"]["round_s"]))
    print(f"{a.model}, batch {a.batch_size}, {a.precision}, {a.threads} thread(s), torch {torch.__version__}")
    print(f"first compiled step (compilation): {compile_s:.1f} s")
    for k in ("eager", "compiled"):
        print(f"{k:<9} median step {med[k] * 1000:7.1f} ms  ({a.batch_size / med[k]:6.1f} samples/s), "
              f"CPU {cpu[k] * 1000:7.1f} ms")
    print(f"speed-up eager/compiled: wall {med['eager'] / med['compiled']:.2f}x, paired rounds {paired:.2f}x, "
          f"CPU time {cpu['eager'] / cpu['compiled']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
