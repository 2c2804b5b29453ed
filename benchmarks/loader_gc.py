"""Where the loader's time goes with --use-rewrites: CPU and garbage-collector time per batch, in process.

    python -m benchmarks.loader_gc --shards 'icon_bench/train/{00000..00005}.tar' --batches 60

Runs vlp's train loader with 0 workers (so every cost lands in this process, measured with
`time.process_time` and `gc.callbacks`) for four rows in one run: captions only / with rewrites, each with
the loader's `gc.freeze()` (the default) and without it (patched out for the row, `gc.unfreeze()` before).
The rewrites' new words grow the tokenizer's word cache, which makes CPython run full collections over
every object alive (the model, the tokenizer's tables); freezing them at the start of each worker's epoch
takes them out of those walks.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time


def measure(spec: str, model: str, batch_size: int, batches: int, rewrites: bool, freeze: bool) -> dict:
    import torch

    import vlp.data.pipeline as pipeline
    from vlp.config import DataConfig
    from vlp.models import create_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bundle = create_model(model)
    cfg = DataConfig(train_data=spec, batch_size=batch_size, workers=0, use_rewrites=rewrites)
    real = gc.freeze
    gc.freeze = real if freeze else (lambda: None)
    gc_time, starts, collections = [0.0], [0.0], [0, 0, 0]

    def on_gc(phase, info):
        if phase == "start":
            starts[0] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - starts[0]
            collections[info["generation"]] += 1

    try:
        it = iter(pipeline.build_train_loader(cfg, bundle.preprocess_train, bundle.tokenizer))
        next(it)  # worker start, shuffle buffer fill
        gc.callbacks.append(on_gc)
        cpu = time.process_time()
        for _ in range(batches):
            next(it)
        cpu = time.process_time() - cpu
    finally:
        gc.callbacks.remove(on_gc) if on_gc in gc.callbacks else None
        gc.freeze = real
    return {"cpu_ms": 1e3 * cpu / batches, "gc_ms": 1e3 * gc_time[0] / batches, "collections": collections}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard spec whose samples carry rewrites")
    p.add_argument("--model", default="vlp-tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    print(f"{a.batches} batches of {a.batch_size}, {a.model}, {a.threads} thread(s), {os.cpu_count()} CPUs")
    print("| captions | gc.freeze | CPU ms/batch | GC ms/batch | collections gen0/1/2 |")
    print("|---|---|---|---|---|")
    rows = {}
    for rewrites in (False, True):
        for freeze in (False, True):   # each row in a fresh interpreter, whose collector state is a run's
            code = (f"import json, benchmarks.loader_gc as b; print(json.dumps(b.measure({a.shards!r}, {a.model!r}, "
                    f"{a.batch_size}, {a.batches}, {rewrites}, {freeze})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
            r = rows[rewrites, freeze] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {'with rewrites' if rewrites else 'caption only'} | {'yes' if freeze else 'no'} | "
                  f"{r['cpu_ms']:.0f} | {r['gc_ms']:.0f} | {'/'.join(map(str, r['collections']))} |", flush=True)
    ratio = rows[True, False]["cpu_ms"] / max(rows[True, True]["cpu_ms"], 1e-9)
    print(f"with rewrites, CPU per batch without / with gc.freeze: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
