"""CPU training throughput: torch's default intra-op threads vs the ones vlp picks, on an idle and a loaded machine.

    python -m benchmarks.cpu_threads [--steps 16] [--batch-size 32] [--workers 2] [--rounds 1] [--load-procs 0=2x cores]

Each measurement is a real `vlp.train.loop.train` run (vlp-tiny, demo shards at 64 px, fp32) in
its own process, so torch's thread pool starts fresh: "default" passes `--threads` = the usable core
count (what torch starts with), "vlp" leaves it to vlp's rule (cores // processes - loader workers, at
least 1). The figure is `perf/samples_per_s` over the run's logged steps (telemetry's Meter: loader waits
included, logging and checkpointing excluded), best of --rounds. "loaded" repeats both while this script
keeps --load-procs processes spinning (2 x cores by default), standing in for other jobs on the machine.
The 1-minute load average is printed before each case: on a shared machine "idle" is only as idle as the
other users let it be.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def run_once(data: str, logs: Path, name: str, steps: int, workers: int, threads, batch: int) -> float:
    """samples/s of one training run in a fresh process (mean of its perf/samples_per_s rows after the first)."""
    cmd = [sys.executable, str(REPO / "train.py"), "--train-data", data, "--model", "vlp-tiny", "--logs", str(logs),
           "--name", name, "--batch-size", str(batch), "--workers", str(workers), "--max-steps", str(steps),
           "--warmup", "1", "--log-every", str(max(1, steps // 4)), "--save-every", str(10 * steps), "--report-to", "none",
           "--no-progress", "--precision", "fp32"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (logs / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r][1:]  # first window: warm-up
    return sum(rates) / len(rates)


def main(argv=None) -> int:
    from vlp.train.threads import pick_threads, usable_cores

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--load-procs", type=int, default=0, help="spinning processes for the loaded case (0: 2 x cores)")
    a = p.parse_args(argv)
    cores = usable_cores()
    chosen = pick_threads(cores, a.workers)
    load_procs = a.load_procs or 2 * cores
    print(f"setup: {cores} usable cores, {a.workers} loader workers; torch default {cores} threads, vlp picks {chosen}")
    with tempfile.TemporaryDirectory() as tmp:
        from data_tools.make_demo_data import write_train

        write_train(Path(tmp) / "train", 1000, 64, 250, 0, False)
        data = str(Path(tmp) / "train" / "{00000..00003}.tar")
        results = {}
        for case in ("idle", "loaded"):
            stop, procs = mp.Event(), []
            if case == "loaded":
                procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load_procs)]
                for proc in procs:
                    proc.start()
                time.sleep(2)
            try:
                print(f"{case}: 1-min load average {os.getloadavg()[0]:.1f} on {cores} cores"
                      + (f" (+{load_procs} spinning processes of this script)" if procs else ""))
                best = {"default": 0.0, "vlp": 0.0}
                for r in range(a.rounds):
                    for label, threads in (("default", cores), ("vlp", None)):
                        rate = run_once(data, Path(tmp) / "logs", f"{case}-{label}-{r}", a.steps, a.workers, threads,
                                        a.batch_size)
                        best[label] = max(best[label], rate)
                        print(f"  round {r + 1} {label:7s} ({cores if threads else chosen} threads): {rate:6.1f} samples/s")
            finally:
                stop.set()
                for proc in procs:
                    proc.join()
            results[case] = best
            print(f"{case}: default {best['default']:.1f} samples/s, vlp {best['vlp']:.1f}, "
                  f"ratio {best['vlp'] / max(best['default'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
