"""End-to-end training throughput: vlp's train.py against open_clip_train's main, same shards, same flags,
same run.

    .venv/bin/python benchmarks/train_e2e.py                      # vlp-tiny on CPU, 224 px JPEG shards
    .venv/bin/python benchmarks/train_e2e.py --model ViT-B-32 --precision amp_bf16 --batch-size 1024 \
        --workers 8 --threads 8 --samples 65536 --steps 50         # on a GPU

Writes (or reuses, --shards) JPEG shards of 224x224 photos-like images (benchmarks/loader.py's
generator: a smooth random scene plus noise, quality 90, captions of 5-15 words, sizes.json), then runs
each trainer as its own process (`--rounds` times, alternating which goes first), each on the same
shards with the same model, batch size, workers, steps, lr, warmup, precision, seed and threads:

  vlp              `train.py` (its real loader, loop, final checkpoint and export)
  open_clip_train  `open_clip_train.main.main` with `--dataset-type webdataset --train-num-samples
                   steps*batch --epochs 1` (its wds pipeline, train_one_epoch, final checkpoint); the
                   webdataset 1.x empty end-of-shard record is dropped for it (shared/reference.md).

Reported per trainer and round:
  end-to-end samples/s   steps * batch / the process's wall time (start-up, imports, model build,
                         worker start, training, final checkpoint: what a user waits for); the headline
  steady samples/s       from the trainer's own step timing, first log window (start-up) left out:
                         vlp's perf/samples_per_s, open_clip_train's "Batch (t)" log lines
  data-wait share        time waiting for the next batch / step time, same windows: vlp's
                         perf/data_wait_frac, open_clip_train's "Data (t)" / "Batch (t)"
  samples per CPU-s      steps * batch / CPU time of the trainer's process and its data workers: hardly
                         moves with other processes' load on a shared machine
  peak memory            CUDA: torch.cuda.max_memory_allocated in the trainer's process; CPU: peak RSS
                         of the trainer's main process and of its largest data worker
The target on CPU at vlp-tiny is vlp >= 1.2x open_clip_train end to end (median over rounds).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# open_clip's precision names, which vlp's --precision shares: both trainers get the same one.
PRECISIONS = ("fp32", "amp_bf16", "amp", "bf16", "fp16", "pure_bf16", "pure_fp16")
TRAINERS = ("vlp", "open_clip_train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vlp-tiny", help="open_clip model name (vlp's configs registered)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="both trainers' --precision (amp_bf16: fp32 weights under bf16 autocast)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    p.add_argument("--workers", type=int, default=2, help="data loader workers of each trainer")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each trainer's main process")
    p.add_argument("--rounds", type=int, default=2, help="runs of each trainer, alternating who goes first")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--shards", default=None, help="existing shard spec with sizes.json (default: write new ones)")
    p.add_argument("--out", default=None, help="folder for the generated shards and run folders (default: temp)")
    p.add_argument("--samples", type=int, default=None, help="samples to generate (default: steps * batch)")
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224, help="side of the generated JPEGs")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    # internal: run one trainer in this process (the parent measures it)
    p.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    a, rest = p.parse_known_args(argv)
    a.trainer_args = rest[1:] if rest[:1] == ["--"] else rest
    return a


# ----------------------------------------------------------------------------- one trainer, in a child process

def _drop_empty_wds_records() -> None:
    """open_clip_train under webdataset 1.x: drop the empty record emitted at each shard's end (reference.md)."""
    import open_clip_train.data as ocd

    orig = ocd.tar_file_expander
    ocd.tar_file_expander = lambda *a, **k: (r for r in orig(*a, **k) if r and "fname" in r)


def child(a) -> int:
    import torch

    torch.set_num_threads(a.threads)
    import vlp.models  # noqa: F401  (vlp-tiny & co. known to open_clip by name, for both trainers)

    if a.child == "vlp":
        import train as vlp_train

        rc = vlp_train.main(a.trainer_args)
    else:
        _drop_empty_wds_records()
        from open_clip_train.main import main as oc_main

        oc_main(a.trainer_args)
        rc = 0
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"rc": rc, "maxrss_main_mb": me.ru_maxrss / 1024, "maxrss_worker_mb": workers.ru_maxrss / 1024,
           "cpu_s": me.ru_utime + me.ru_stime + workers.ru_utime + workers.ru_stime}
    if torch.cuda.is_available():
        out["cuda_max_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    Path(a.child_result).write_text(json.dumps(out))
    return rc


# ----------------------------------------------------------------------------- the parent

def trainer_args(name: str, a, spec: str, logs: Path, run: str) -> list[str]:
    common = ["--train-data", spec, "--model", a.model, "--batch-size", str(a.batch_size), "--workers",
              str(a.workers), "--lr", str(a.lr), "--warmup", str(a.warmup), "--seed", "0", "--logs", str(logs),
              "--name", run, "--precision", a.precision]
    if name == "vlp":
        return common + ["--max-steps", str(a.steps), "--log-every", str(a.log_every),
                         "--report-to", "none", "--no-progress"]
    return common + ["--dataset-type", "webdataset", "--train-num-samples", str(a.steps * a.batch_size),
                     "--epochs", "1",
                     "--log-every-n-steps", str(a.log_every), "--report-to", "", "--save-frequency", "1"]


def steady_vlp(run_dir: Path, batch: int) -> dict:
    """Steady figures from vlp's perf/* rows (each covers the steps since the previous row)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_ms" in r]
    windows, prev = [], 0
    for r in rows:
        n = r["step"] - prev
        prev = r["step"]
        windows.append((n, n * r["perf/step_ms"] / 1e3, n * r["perf/step_ms"] / 1e3 * r["perf/data_wait_frac"]))
    return _steady(windows[1:], batch)


OC_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


def steady_open_clip(run_dir: Path, batch: int) -> dict:
    """Steady figures from open_clip_train's out.log lines (window averages of data and batch time), and the steps
    it really ran (its loader can yield fewer batches than --train-num-samples asks: 24 of 30 at ViT-B/32, batch
    2048, 8 workers), from its last line's sample count."""
    windows, prev = [], 0
    for m in OC_LINE.finditer((run_dir / "out.log").read_text()):
        step = int(m.group(1)) // batch
        n = step - prev
        prev = step
        windows.append((n, n * float(m.group(3)), n * float(m.group(2))))
    return {**_steady(windows[1:], batch), "steps": prev}


def _steady(windows: list[tuple[int, float, float]], batch: int) -> dict:
    steps, busy, wait = (sum(w[i] for w in windows) for i in range(3))
    if not steps or busy <= 0:
        return {"steady_samples_per_s": None, "data_wait_frac": None}
    return {"steady_samples_per_s": steps * batch / busy, "data_wait_frac": wait / busy}


def run_one(name: str, a, spec: str, logs: Path, run: str, timeout: Optional[float] = None,
            errors_as_rows: bool = False) -> dict:
    """One trainer's run in its own process. `errors_as_rows`: a failure (out of memory, a timeout) is returned as
    {"error": ...} instead of stopping the benchmark."""
    result_file = logs / f"{run}.result.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-result", str(result_file),
           "--threads", str(a.threads), "--", *trainer_args(name, a, spec, logs, run)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        if errors_as_rows:
            return {"error": f"stopped after {timeout:.0f} s (time budget)"}
        raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_file.exists():
        if errors_as_rows:
            return {"error": failure_line(proc.stderr)}
        raise SystemExit(f"error: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(result_file.read_text())
    steady = steady_vlp if name == "vlp" else steady_open_clip
    out.update(steady(logs / run, a.batch_size))
    steps = out.pop("steps", None) or a.steps   # the steps it really ran (open_clip_train's from its log)
    out.update(wall_s=wall, steps=steps, e2e_samples_per_s=steps * a.batch_size / wall,
               samples_per_cpu_s=steps * a.batch_size / out["cpu_s"])
    return out


def failure_line(stderr: str) -> str:
    """The line that says why a trainer process failed: out of memory above all."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    oom = next((line for line in reversed(lines)
                if "out of memory" in line.lower() or "can't allocate memory" in line.lower()), None)
    return "out of memory" + (f" ({oom[:120]})" if oom else "") if oom else (lines[-1][:200] if lines else "failed")


def _fmt(x, spec=".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.child:
        raise SystemExit(child(a))
    import torch

    from benchmarks.loader import write_bench_shards

    tmp = tempfile.TemporaryDirectory(prefix="vlp_e2e_") if a.out is None else None
    base = Path(a.out or tmp.name)
    spec = a.shards
    if spec is None:
        n = a.samples or a.steps * a.batch_size
        t = time.time()
        per_shard = max(1, min(a.per_shard, n // (2 * a.workers)))  # open_clip_train wants shards >= workers
        spec = write_bench_shards(base / "shards", n, per_shard, a.image_size, a.image_size)
        print(f"wrote {n} {a.image_size}x{a.image_size} JPEGs to {spec} in {time.time() - t:.1f}s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {k: [] for k in TRAINERS}
    for r in range(a.rounds):
        for name in (TRAINERS if r % 2 == 0 else TRAINERS[::-1]):
            res = run_one(name, a, spec, base / "runs", f"{name}_{r}")
            results[name].append(res)
            mem = (f"max CUDA memory {res['cuda_max_mem_gb']:.2f} GB" if "cuda_max_mem_gb" in res else
                   f"peak RSS main {res['maxrss_main_mb']:.0f} MB, worker {res['maxrss_worker_mb']:.0f} MB")
            print(f"round {r}: {name:16s} end-to-end {res['e2e_samples_per_s']:7.1f} samples/s "
                  f"({res['wall_s']:.1f} s; {res['samples_per_cpu_s']:.1f} per CPU-second), steady {_fmt(res['steady_samples_per_s'])} samples/s, "
                  f"data wait {_fmt(res['data_wait_frac'] and 100 * res['data_wait_frac'])}%, {mem}", flush=True)
    med = {k: statistics.median(x["e2e_samples_per_s"] for x in v) for k, v in results.items()}
    ratio = med["vlp"] / med["open_clip_train"]
    paired = statistics.median(v["e2e_samples_per_s"] / o["e2e_samples_per_s"]
                               for v, o in zip(results["vlp"], results["open_clip_train"]))
    cpu = {k: statistics.median(x["samples_per_cpu_s"] for x in v) for k, v in results.items()}
    load = os.getloadavg()[0]
    print(f"setup: {device}, {os.cpu_count()} CPUs (load average {load:.1f}), model={a.model} "
          f"precision={a.precision} batch={a.batch_size} steps={a.steps} workers={a.workers} threads={a.threads}, "
          f"{a.image_size} px JPEG shards, torch {torch.__version__}")
    for k in TRAINERS:
        print(f"{k:16s} end-to-end {med[k]:.1f} samples/s (median of {a.rounds})")
    print(f"ratio vlp/open_clip_train end to end: {ratio:.2f} (paired by round: {paired:.2f}; target >= 1.2 on CPU); "
          f"samples per CPU-second (main process + workers, robust to other load): "
          f"{cpu['vlp'] / cpu['open_clip_train']:.2f}")
    out = {"config": {k: v for k, v in vars(a).items() if k not in ("child", "child_result", "trainer_args")},
           "device": device, "load_average": load, "results": results, "median_e2e": med, "ratio": ratio,
           "paired_ratio": paired, "cpu_time_ratio": cpu["vlp"] / cpu["open_clip_train"]}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
