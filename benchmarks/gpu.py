"""The GPU benchmark, one command that fits one short call: vlp against open_clip_train on one CUDA device,
ViT-B-32 and ViT-B-16 in bf16.

    .venv/bin/python benchmarks/gpu.py                        # on a CUDA device: both models, within --budget-s 420
    .venv/bin/python benchmarks/gpu.py --data-dir /tmp/gpu_data --json gpu.json   # shards kept for the next call
    .venv/bin/python benchmarks/gpu.py --tiny                 # CPU, vlp-tiny, in CI: says the script works

For each model, at the largest batch that fits (the first of `--candidates` with which vlp's step runs without
running out of memory), in bf16 autocast over fp32 weights (`--precision amp_bf16`, both trainers):
  ceiling      compute only: vlp's `Trainer.step` and open_clip_train's `train_one_epoch` on random images and
               tokens already on the GPU (benchmarks/step_runners.py; no data loading, no logging)
  end to end   vlp's train.py and open_clip_train's main on the same generated 224 px JPEG shards with the same
               flags (benchmarks/train_e2e.py): their real loaders, loops and checkpoints
Every trainer runs in its own process (so each peak memory is its own, and one running out of memory is a row that
says so); open_clip_train's samples/s use the steps it really ran, read from its own log. The shards are written
by all cores at once (or reused from `--data-dir`), so training starts within about a minute on 16 cores; the
whole run stops at `--budget-s` (rows not reached say so) and the table and the JSON are printed whatever happened.
Reported per (model, setting, trainer): samples/s (ceiling: median round; end to end: steady, from the trainer's
own step timing after its first log window, and wall-clock including start-up), MFU (samples/s x training FLOPs
per sample from `vlp.train.telemetry.train_flops_per_sample` / the GPU's peak dense bf16 from `peak_flops`, or
`--peak-tflops`), data wait (vlp: perf/data_wait_frac, the GPU's idle time measured with CUDA events;
open_clip_train: its host-side "Data (t)" share) and peak memory (torch.cuda.max_memory_allocated).
Targets on an H100 (docs/scale.md): ViT-B/16 MFU >= 45%, data wait < 5%, vlp >= 1.5x open_clip_train end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPU_CANDIDATES = {"ViT-B-32": "2048,1536,1024,768,512", "ViT-B-16": "1024,768,512,384,256"}
TRAINERS = ("vlp", "open_clip_train")
TINY = dict(model="vlp-tiny", candidates="8", precision="fp32", steps=2, repeats=1, warmup=1, e2e_steps=4,
            log_every=2, workers=1, threads=1, image_size=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="vlp-tiny on the CPU, a few steps: checks the script (CI)")
    p.add_argument("--model", default="ViT-B-32,ViT-B-16", help="comma-separated")
    p.add_argument("--candidates", default=None, help="batch sizes tried, largest first; one model: one list "
                   f"(default per model: {GPU_CANDIDATES})")
    p.add_argument("--precision", default="amp_bf16")
    p.add_argument("--steps", type=int, default=10, help="ceiling: timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="ceiling: rounds")
    p.add_argument("--warmup", type=int, default=3, help="ceiling: untimed steps first")
    p.add_argument("--e2e-steps", type=int, default=30, help="end to end: optimiser steps per run")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers per trainer")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224, help="side of the generated JPEGs")
    p.add_argument("--no-e2e", action="store_true", help="the compute-only ceiling alone")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    p.add_argument("--budget-s", type=float, default=420, help="the whole run stops after this many seconds")
    p.add_argument("--data-dir", default=None, help="keep the generated shards here and reuse them next time")
    p.add_argument("--out", default=None, help="folder for the runs (default: temporary)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)   # one ceiling measurement, in a process
    p.add_argument("--child-batch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        given = {k for k in vars(a) if any(arg.startswith("--" + k.replace("_", "-")) for arg in (argv or sys.argv))}
        for k, v in TINY.items():
            if k not in given:
                setattr(a, k, v)
    return a


# ----------------------------------------------------------------------------- the ceiling, in a child process

def _random_batches(model_name: str, batch_size: int, device, seed: int = 0) -> list:
    import open_clip
    import torch

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


def ceiling_child(a) -> dict:
    """One trainer's compute-only figures at the first batch size of `--child-batch` (largest first) that fits."""
    import torch

    from benchmarks.step_runners import OpenClipRunner, VlpRunner, _Stream, summarise, time_pair
    from vlp.config import OptimConfig
    from vlp.models import create_model, resolve_model_name

    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    state = create_model(a.model).model.state_dict()
    total, o = a.warmup + a.steps * a.repeats + 4, OptimConfig()
    from vlp.train.telemetry import peak_flops

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
           "peak_flops": peak_flops(device)}
    for batch in [int(b) for b in a.child_batch.split(",")]:
        common = dict(batch_size=batch, accum_freq=1, precision=a.precision, compile_=False, total_steps=total,
                      device=str(device), seed=0)
        try:
            runner = (VlpRunner(a.model, state, **common) if a.child == "vlp" else
                      OpenClipRunner(resolve_model_name(a.model), state, lr=o.lr, wd=o.wd, betas=(o.beta1, o.beta2),
                                     eps=o.eps, **common))
            times = time_pair([runner], {runner.name: _Stream(_random_batches(a.model, batch, device))},
                              steps=a.steps, warmup=a.warmup, repeats=a.repeats)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:   # RuntimeError: the CPU allocator's refusal
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "allocate memory" not in str(e):
                raise
            runner = None
            out.setdefault("out_of_memory", []).append(batch)
            torch.cuda.empty_cache()
            continue
        out.update(batch=batch, samples_per_s=summarise(times[runner.name], batch, a.steps)["median_round"],
                   max_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
        return out
    out["error"] = f"out of memory at batch {', '.join(map(str, out['out_of_memory']))}"
    return out


def ceiling(model: str, trainer: str, batches: str, a, deadline: float, base: Path) -> dict:
    result = base / f"ceiling_{Path(model).stem}_{trainer}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", trainer, "--child-batch", batches,
           "--child-result", str(result), "--model", model, "--precision", a.precision, "--steps", str(a.steps),
           "--repeats", str(a.repeats), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    try:
        proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=_left(deadline))
    except subprocess.TimeoutExpired:
        return {"error": "stopped: --budget-s spent"}
    if not result.exists():
        from benchmarks.train_e2e import failure_line

        return {"error": failure_line(proc.stderr)}
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------- end to end

def shards(a, n: int, base: Path) -> str:
    """Shards of `n` generated JPEGs, written by every core; reused from --data-dir when it holds as many."""
    from benchmarks.loader import write_bench_shards

    folder = Path(a.data_dir) if a.data_dir else base / "shards"
    made = folder / "made.json"
    want = {"n": n, "image_size": a.image_size}
    if made.exists() and json.loads(made.read_text()).get("want") == want:
        print(f"reusing {n} JPEGs in {folder}", flush=True)
        return json.loads(made.read_text())["spec"]
    t = time.time()
    per_shard = max(1, min(256, n // (2 * a.workers)))  # open_clip_train wants at least as many shards as workers
    spec = write_bench_shards(folder, n, per_shard, a.image_size, a.image_size, procs=os.cpu_count() or 1)
    made.write_text(json.dumps({"want": want, "spec": spec}))
    print(f"wrote {n} {a.image_size}x{a.image_size} JPEGs in {time.time() - t:.1f}s ({os.cpu_count()} processes)",
          flush=True)
    return spec


def end_to_end(model: str, trainer: str, batch: int, a, spec: str, deadline: float, base: Path) -> dict:
    from benchmarks import train_e2e

    e = SimpleNamespace(model=model, precision=a.precision, batch_size=batch, steps=a.e2e_steps,
                        log_every=a.log_every, workers=a.workers, threads=a.threads, lr=5e-4, warmup=5)
    r = train_e2e.run_one(trainer, e, spec, base / "runs", f"{Path(model).stem}_{trainer}", timeout=_left(deadline),
                          errors_as_rows=True)
    if "error" in r:
        return r
    return {"samples_per_s": r.get("steady_samples_per_s"), "e2e_samples_per_s": r["e2e_samples_per_s"],
            "steps": r["steps"], "data_wait_frac": r["data_wait_frac"], "max_mem_gb": r.get("cuda_max_mem_gb")}


# ----------------------------------------------------------------------------- the parent

def _left(deadline: float) -> float:
    return max(1.0, deadline - time.perf_counter())


def _flops(model: str) -> int:
    from vlp.models import create_model
    from vlp.train.telemetry import train_flops_per_sample

    return train_flops_per_sample(create_model(model).model)


def run_all(a, rows: list, meta: dict, deadline: float, base: Path) -> None:
    """Fill `rows` as the measurements come (a failure or the budget's end leaves the rows so far)."""
    models = [m.strip() for m in a.model.split(",") if m.strip()]
    probes = {}
    for m in models:   # vlp's ceiling finds the batch size; open_clip_train's runs at it
        probes[m] = ceiling(m, "vlp", a.candidates or GPU_CANDIDATES.get(m, "256,128,64"), a, deadline, base)
        meta.setdefault("device", probes[m].get("device"))
        meta.setdefault("peak_flops", probes[m].get("peak_flops"))   # the parent never touches the GPU
    peak = meta["peak_flops"] = a.peak_tflops * 1e12 if a.peak_tflops else meta.get("peak_flops")
    batches = {m: p.get("batch") for m, p in probes.items()}
    spec = None
    if not a.no_e2e and any(batches.values()) and time.perf_counter() < deadline:
        spec = shards(a, max(b for b in batches.values() if b) * a.e2e_steps, base)
    for m in models:
        flops, b = _flops(m), batches[m]
        plan = [("ceiling", "vlp", lambda: probes[m])]
        plan.append(("ceiling", "open_clip_train", lambda: ceiling(m, "open_clip_train", str(b), a, deadline, base)))
        if not a.no_e2e:
            plan += [("end to end", t, lambda t=t: end_to_end(m, t, b, a, spec, deadline, base)) for t in TRAINERS]
        for setting, trainer, fn in plan:
            row = {"model": m, "batch": b, "setting": setting, "trainer": trainer}
            if not b:
                row["error"] = probes[m].get("error", "no batch size fits")
            elif time.perf_counter() >= deadline:
                row["error"] = "not run: --budget-s spent"
            else:
                row.update({k: v for k, v in fn().items()
                            if k not in ("device", "batch", "out_of_memory", "peak_flops")})
            if row.get("samples_per_s"):
                row["mfu"] = row["samples_per_s"] * flops / peak if peak else None
            rows.append(row)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(rows: list, meta: dict, a) -> dict:
    """The table (and the JSON, with --json): printed whatever happened."""
    print(f"\n== {meta.get('device')}, {a.precision}, budget {a.budget_s:.0f} s, wall {meta['wall_s']:.0f} s ==")
    print(f"{'model':>10s} {'batch':>5s} {'setting':>10s} {'trainer':>15s} {'samples/s':>9s} {'wall s/s':>8s} "
          f"{'MFU':>6s} {'wait':>6s} {'mem GB':>6s}")
    for r in rows:
        head = f"{Path(r['model']).stem:>10s} {str(r['batch'] or '-'):>5s} {r['setting']:>10s} {r['trainer']:>15s}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        sps, e2e, mem = r.get("samples_per_s"), r.get("e2e_samples_per_s"), r.get("max_mem_gb")
        print(f"{head} {'n/a' if sps is None else f'{sps:9.1f}':>9s} {'-' if e2e is None else f'{e2e:8.1f}':>8s} "
              f"{_pct(r.get('mfu')):>6s} {_pct(r.get('data_wait_frac')):>6s} "
              f"{'n/a' if mem is None else f'{mem:.1f}':>6s}")
    ratios = {}
    for m in dict.fromkeys(r["model"] for r in rows):
        e2e = {r["trainer"]: r for r in rows if r["model"] == m and r["setting"] == "end to end"}
        if all(e2e.get(t, {}).get("samples_per_s") for t in TRAINERS):
            ratios[m] = e2e["vlp"]["samples_per_s"] / e2e["open_clip_train"]["samples_per_s"]
            print(f"{m}: vlp / open_clip_train end to end {ratios[m]:.2f} (steady), "
                  f"{e2e['vlp']['e2e_samples_per_s'] / e2e['open_clip_train']['e2e_samples_per_s']:.2f} (wall clock)")
    print("(wait: vlp GPU idle from CUDA events, open_clip_train host-side)")
    out = {**meta, "precision": a.precision, "rows": rows, "e2e_ratio": ratios}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.child:
        Path(a.child_result).write_text(json.dumps(ceiling_child(a)))
        return {}
    t0 = time.perf_counter()
    deadline = t0 + a.budget_s - 15   # the table and the JSON need a few seconds at the end
    tmp = tempfile.TemporaryDirectory(prefix="vlp_gpu_") if a.out is None else None
    base = Path(a.out or tmp.name)
    base.mkdir(parents=True, exist_ok=True)
    rows: list = []
    meta: dict = {}
    try:
        run_all(a, rows, meta, deadline, base)
    except KeyboardInterrupt:
        meta["stopped"] = "interrupted"
    finally:
        meta["wall_s"] = time.perf_counter() - t0
        out = report(rows, meta, a)
        if tmp is not None:
            tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
