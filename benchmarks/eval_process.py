"""Whole-process zero-shot evaluation: `vlp eval` against `clip_benchmark eval`, each timed as the user waits for
it (a fresh process: imports, model build, decoding, the classifier over classes x templates, scoring, writing).

    .venv/bin/python benchmarks/eval_process.py                 # 1,500 classes x 4 templates, 500 images
    .venv/bin/python benchmarks/eval_process.py --load 2        # the same with 2 busy processes beside it

Both sides score the same random-weight `vlp-tiny` open_clip export (CLIP_benchmark as `local-dir:EXPORT`) on
the same one-split webdataset set, fp32, 0 loader workers, with the same thread count: OMP_NUM_THREADS and
MKL_NUM_THREADS set to --threads for both (CLIP_benchmark sets none itself, so torch would take every core).
Runs alternate sides, --repeat each, best wall time kept; the 1-minute load average is printed before and
after each side, since the figures only compare on a machine whose load did not change between them.
CLIP_benchmark 1.6.2's zero-shot `accuracy()` fails under NumPy 2 after all its work is done, so its command
runs its own `main()` with `numpy2_safe_accuracy` in its place (benchmarks/eval.py; the same figures).
--profile adds where vlp's time goes: imports, model load, images, the text tower, writing (cProfile).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CB_MAIN = ("import sys; from benchmarks.eval import numpy2_safe_accuracy\n"
           "import clip_benchmark.metrics.zeroshot_classification as zc; zc.accuracy = numpy2_safe_accuracy\n"
           "from clip_benchmark.cli import main; sys.argv = ['clip_benchmark'] + sys.argv[1:]; sys.exit(main())")


def prepare(tmp: Path, classes: int, templates: int, images: int) -> tuple[Path, Path]:
    import open_clip
    import torch

    from benchmarks.eval import make_wds_set
    from vlp.models import create_model, export_open_clip

    root = tmp / "zs_set"
    make_wds_set(root, images, classes, templates, 64)
    torch.manual_seed(0)
    b = create_model("vlp-tiny")
    export = Path(export_open_clip(b.model, b.model_cfg, open_clip.get_model_preprocess_cfg(b.model), tmp / "export"))
    return root, export


def commands(root: Path, export: Path, out: Path, batch: int) -> dict[str, list[str]]:
    return {
        "vlp": [sys.executable, "-m", "vlp", "eval", "--checkpoint", str(export), "--data", str(root), "--output",
                str(out / "vlp"), "--quiet", "--no-geometry", "--precision", "fp32", "--batch-size", str(batch),
                "--workers", "0"],
        "clip_benchmark": [sys.executable, "-c", CB_MAIN, "eval", "--dataset", f"wds/{root.name}", "--dataset_root",
                           str(root), "--model", f"local-dir:{export}", "--pretrained", "", "--task",
                           "zeroshot_classification", "--no_amp", "--num_workers", "0", "--batch_size", str(batch),
                           "--output", str(out / "cb.json")],
    }


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{cmd[2] if cmd[1] == '-m' else 'clip_benchmark'} failed: {done.stderr.strip()[-600:]}")
    return wall


def _spin():   # a busy core, for --load
    while True:
        pass


def profile_vlp(cmd: list[str], threads: int, tmp: Path) -> dict[str, float]:
    """Seconds of vlp's phases from one cProfile run (its overhead included)."""
    import pstats

    prof = tmp / "vlp.prof"
    timed([sys.executable, "-m", "cProfile", "-o", str(prof), *cmd[1:]], threads)
    stats = pstats.Stats(str(prof)).stats   # {(file, line, name): (cc, nc, tt, ct, callers)}

    def cum(file_end: str, name: str) -> float:
        return sum(v[3] for (f, _, n), v in stats.items() if f.endswith(file_end) and n == name)

    total = cum("vlp/cli.py", "main")
    phases = {"model load": cum("vlp/models.py", "load_checkpoint"), "images (decode + tower)": cum("vlp/eval/api.py", "_images"),
              "text tower (classifier)": cum("vlp/eval/zeroshot.py", "build_classifier"),
              "writing": cum("vlp/eval/report.py", "write_results")}
    phases["imports and the rest"] = total - sum(phases.values())
    return {k: round(v, 2) for k, v in phases.items()} | {"total": round(total, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1500)
    p.add_argument("--templates", type=int, default=4)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="for both sides (default: cores)")
    p.add_argument("--repeat", type=int, default=1, help="runs per side, alternating; the best is kept")
    p.add_argument("--load", type=int, default=0, help="busy processes kept running beside both sides")
    p.add_argument("--profile", action="store_true", help="also print where vlp's time goes (one cProfile run)")
    a = p.parse_args(argv)
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(a.load)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root, export = prepare(tmp, a.classes, a.templates, a.images)
        cmds = commands(root, export, tmp, a.batch_size)
        for s in spinners:
            s.start()
        walls: dict[str, list[float]] = {"vlp": [], "clip_benchmark": []}
        loads = []
        try:
            for rep in range(a.repeat):
                for side in (("clip_benchmark", "vlp") if rep % 2 == 0 else ("vlp", "clip_benchmark")):
                    before = os.getloadavg()[0]
                    walls[side].append(timed(cmds[side], a.threads))
                    loads.append((side, round(before, 2), round(os.getloadavg()[0], 2)))
            phases = profile_vlp(cmds["vlp"], a.threads, tmp) if a.profile else None
        finally:
            for s in spinners:
                s.terminate()
    t_vlp, t_cb = min(walls["vlp"]), min(walls["clip_benchmark"])
    print(f"whole-process zero-shot ({a.classes} classes x {a.templates} templates, {a.images} images, vlp-tiny, "
          f"{a.threads} threads each, {a.load} busy processes beside, {os.cpu_count()} CPUs): CLIP_benchmark "
          f"{t_cb:.1f} s, vlp {t_vlp:.1f} s, ratio {t_cb / t_vlp:.2f}x")
    print("  1-min load average before -> after each run: " + "; ".join(f"{s} {b} -> {e}" for s, b, e in loads))
    if phases:
        print("  vlp under cProfile (s): " + ", ".join(f"{k} {v}" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
