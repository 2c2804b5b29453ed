"""The GPU benchmark, one command: vlp against open_clip_train on one CUDA device, ViT-B-32 and ViT-B-16 in bf16.

    .venv/bin/python benchmarks/gpu.py                       # on a CUDA device: both models, < 8 min on an H100
    .venv/bin/python benchmarks/gpu.py --json gpu.json       # also keep the figures
    .venv/bin/python benchmarks/gpu.py --model ViT-B-16 --batch-size 512 --e2e-steps 40
Without CUDA it runs the same code on the CPU with a tiny model in about a minute (tests/test_gpu_bench.py
runs it so it cannot rot): its figures say the script works, nothing about a GPU.

For each model, at the largest batch that fits (`--batch-size auto`: the first of `--candidates` with which
vlp's step runs without running out of memory), in bf16 autocast over fp32 weights (`--precision amp_bf16`,
both trainers):
  ceiling      compute only: vlp's training step and open_clip_train's `train_one_epoch` on random images
               and tokens already on the GPU (benchmarks/step_runners.py; no data loading, no logging)
  end to end   vlp's train.py and open_clip_train's main as processes, on the same generated 224 px JPEG
               shards with the same flags (benchmarks/train_e2e.py): its real loaders, loops and checkpoints
Reported per (model, setting, trainer): samples/s (ceiling: median round; end to end: steady, from the
trainer's own step timing after its first log window, and wall-clock including start-up), MFU (samples/s x
training FLOPs per sample from `vlp.train.telemetry.train_flops_per_sample` / the GPU's peak dense bf16 from
`peak_flops`, or `--peak-tflops`), data wait (vlp: perf/data_wait_frac, the GPU's idle time measured with
CUDA events; open_clip_train: its host-side "Data (t)" share) and peak memory (torch.cuda.max_memory_allocated).
Targets on an H100 (issue 23): ViT-B/16 MFU >= 45%, data wait < 5%, vlp >= 1.5x open_clip_train end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.step_runners import _Stream, build_runners, summarise, time_pair  # noqa: E402

GPU_CANDIDATES = {"ViT-B-32": "2048,1536,1024,768,512", "ViT-B-16": "1024,768,512,384,256"}
TRAINERS = ("vlp", "open_clip_train")


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ViT-B-32,ViT-B-16" if cuda else "vlp-tiny", help="comma-separated")
    p.add_argument("--batch-size", default="auto" if cuda else "16",
                   help="'auto' (largest of --candidates that fits), one size, or one per model")
    p.add_argument("--candidates", default=None, help="batch sizes tried by 'auto', largest first "
                   f"(default per model: {GPU_CANDIDATES})")
    p.add_argument("--precision", default="amp_bf16" if cuda else "fp32")
    p.add_argument("--steps", type=int, default=10 if cuda else 2, help="ceiling: timed steps per round")
    p.add_argument("--repeats", type=int, default=3 if cuda else 1, help="ceiling: rounds")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1, help="ceiling: untimed steps first")
    p.add_argument("--e2e-steps", type=int, default=30 if cuda else 4, help="end to end: optimiser steps per run")
    p.add_argument("--log-every", type=int, default=5 if cuda else 2)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if cuda else 1)
    p.add_argument("--threads", type=int, default=4 if cuda else 1)
    p.add_argument("--image-size", type=int, default=224 if cuda else 64, help="side of the generated JPEGs")
    p.add_argument("--no-e2e", action="store_true", help="the compute-only ceiling alone")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    p.add_argument("--out", default=None, help="folder for shards and runs (default: temporary)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak(device: torch.device, override) -> float | None:
    from vlp.train.telemetry import peak_flops

    return override * 1e12 if override else peak_flops(device)


def _train_flops(model_name: str) -> int:
    from vlp.models import create_model
    from vlp.train.telemetry import train_flops_per_sample

    return train_flops_per_sample(create_model(model_name).model)


def _random_batches(model_name: str, batch_size: int, device: torch.device, seed: int = 0) -> list:
    import open_clip

    from vlp.models import resolve_model_name

    cfg = open_clip.get_model_config(resolve_model_name(model_name))
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    ctx, vocab = cfg["text_cfg"].get("context_length", 77), cfg["text_cfg"].get("vocab_size", 49408)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        texts = torch.randint(1, vocab - 1, (batch_size, ctx), generator=g)
        texts[:, -1] = vocab - 1  # an end-of-text token where argmax pooling finds it
        batches.append((torch.randn(batch_size, 3, size, size, generator=g).to(device), texts.to(device)))
    return batches


def _fits(model_name: str, batch_size: int, a, device: torch.device) -> bool:
    """Whether vlp's training step runs at this batch size (two steps on random data)."""
    from benchmarks.step_runners import VlpRunner
    from vlp.models import create_model

    try:
        runner = VlpRunner(model_name, create_model(model_name).model.state_dict(), batch_size=batch_size,
                           accum_freq=1, precision=a.precision, compile_=False, total_steps=8, device=str(device),
                           seed=0)
        runner.run(_Stream(_random_batches(model_name, batch_size, device)), 2)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        runner = None  # noqa: F841 - freed before the next try
        if device.type == "cuda":
            torch.cuda.empty_cache()


def pick_batch(model_name: str, a, device: torch.device, given: str) -> int:
    if given != "auto":
        return int(given)
    candidates = [int(x) for x in (a.candidates or GPU_CANDIDATES.get(model_name, "256,128,64")).split(",")]
    for b in candidates:
        if _fits(model_name, b, a, device):
            return b
    raise SystemExit(f"error: {model_name}: even batch {candidates[-1]} does not fit; pass smaller --candidates")


def ceiling(model_name: str, batch_size: int, a, device: torch.device, flops: int, peak) -> dict:
    """Compute-only samples/s, MFU and peak memory of both trainers' steps on random tensors on the device."""
    out = {}
    total = a.warmup + a.steps * a.repeats + 4
    runners = build_runners(model_name, batch_size=batch_size, accum_freq=1, precision=a.precision, compile_=False,
                            total_steps=total, device=str(device), seed=0)
    batches = _random_batches(model_name, batch_size, device)
    for r in runners:  # one at a time: each one's peak memory is its own
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times = time_pair([r], {r.name: _Stream(batches)}, steps=a.steps, warmup=a.warmup, repeats=a.repeats)
        except torch.cuda.OutOfMemoryError:
            out[r.name] = {"error": "out of memory"}
            continue
        rate = summarise(times[r.name], batch_size, a.steps)["median_round"]
        out[r.name] = {"samples_per_s": rate, "mfu": rate * flops / peak if peak else None, "data_wait_frac": None,
                       "max_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def end_to_end(model_name: str, batch_size: int, a, shards: str, base: Path, flops: int, peak) -> dict:
    """Both trainers as processes on the same shards and flags (benchmarks/train_e2e.py, one round)."""
    from benchmarks import train_e2e

    res = train_e2e.main(["--model", model_name, "--precision", a.precision, "--batch-size", str(batch_size),
                          "--steps", str(a.e2e_steps), "--log-every", str(a.log_every), "--workers", str(a.workers),
                          "--threads", str(a.threads), "--rounds", "1", "--shards", shards,
                          "--image-size", str(a.image_size),
                          "--out", str(base / f"e2e_{Path(model_name).stem}_{batch_size}")])
    out = {}
    for name in TRAINERS:
        r = res["results"][name][0]
        steady = r.get("steady_samples_per_s")
        out[name] = {"samples_per_s": steady, "e2e_samples_per_s": r["e2e_samples_per_s"],
                     "mfu": steady * flops / peak if steady and peak else None, "data_wait_frac": r["data_wait_frac"],
                     "max_mem_gb": r.get("cuda_max_mem_gb")}
    return out


def write_shards(base: Path, n: int, image_size: int, workers: int) -> str:
    from benchmarks.loader import write_bench_shards

    t = time.time()
    per_shard = max(1, min(256, n // (2 * workers)))  # open_clip_train wants at least as many shards as workers
    spec = write_bench_shards(base / "shards", n, per_shard, image_size, image_size)
    print(f"wrote {n} {image_size}x{image_size} JPEGs in {time.time() - t:.1f}s", flush=True)
    return spec


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    import logging

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = _device()
    peak = _peak(device, a.peak_tflops)
    models = [m.strip() for m in a.model.split(",") if m.strip()]
    sizes = [s.strip() for s in a.batch_size.split(",")]
    sizes = sizes * len(models) if len(sizes) == 1 else sizes
    if len(sizes) != len(models):
        raise SystemExit("error: --batch-size: give one, or one per --model")
    tmp = tempfile.TemporaryDirectory(prefix="vlp_gpu_") if a.out is None else None
    base = Path(a.out or tmp.name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    batches = {m: pick_batch(m, a, device, s) for m, s in zip(models, sizes)}
    print(f"device: {name}; peak {peak / 1e12 if peak else 'n/a'} TFLOP/s; batch sizes {batches}", flush=True)
    shards = None if a.no_e2e else write_shards(base, max(batches.values()) * a.e2e_steps, a.image_size, a.workers)
    rows = []
    for m in models:
        flops = _train_flops(m)
        settings = [("ceiling", lambda: ceiling(m, batches[m], a, device, flops, peak))]
        if not a.no_e2e:
            settings.append(("end to end", lambda: end_to_end(m, batches[m], a, shards, base, flops, peak)))
        for setting, fn in settings:
            res = fn()
            for trainer in TRAINERS:
                rows.append({"model": m, "batch": batches[m], "setting": setting, "trainer": trainer, **res[trainer]})
    wall = time.perf_counter() - t0
    print(f"\n== {name}, {a.precision}, torch {torch.__version__} ==")
    print(f"{'model':>10s} {'batch':>5s} {'setting':>10s} {'trainer':>15s} {'samples/s':>9s} {'wall s/s':>8s} "
          f"{'MFU':>6s} {'wait':>6s} {'mem GB':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{Path(r['model']).stem:>10s} {r['batch']:5d} {r['setting']:>10s} {r['trainer']:>15s} {r['error']}")
            continue
        sps, e2e, mem = r["samples_per_s"], r.get("e2e_samples_per_s"), r["max_mem_gb"]
        print(f"{Path(r['model']).stem:>10s} {r['batch']:5d} {r['setting']:>10s} {r['trainer']:>15s} "
              f"{'n/a' if sps is None else f'{sps:9.1f}':>9s} {'-' if e2e is None else f'{e2e:8.1f}':>8s} "
              f"{_pct(r['mfu']):>6s} {_pct(r['data_wait_frac']):>6s} {'n/a' if mem is None else f'{mem:.1f}':>6s}")
    ratios = {}
    for m in models:
        e2e = {r["trainer"]: r for r in rows if r["model"] == m and r["setting"] == "end to end"}
        if all(e2e.get(t, {}).get("samples_per_s") for t in TRAINERS):
            ratios[m] = e2e["vlp"]["samples_per_s"] / e2e["open_clip_train"]["samples_per_s"]
            print(f"{m}: vlp / open_clip_train end to end {ratios[m]:.2f} (steady), "
                  f"{e2e['vlp']['e2e_samples_per_s'] / e2e['open_clip_train']['e2e_samples_per_s']:.2f} (wall clock)")
    print(f"(wait: vlp GPU idle from CUDA events, open_clip_train host-side; total {wall:.0f} s)")
    out = {"device": name, "precision": a.precision, "peak_flops": peak, "torch": torch.__version__, "rows": rows,
           "wall_s": wall, "e2e_ratio": ratios}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
