"""`vlp data filter` on one process against `--engine ray`: wall time and peak memory per process on a synthetic
pool of embed tables (Parquet, D = 512 float16 image and text embeddings, as `vlp data embed` writes them).

    python -m benchmarks.curate_engines --rows 10000000 --engine ray --object-store-gb 2
    python -m benchmarks.curate_engines --rows 1000000 --engine local
    python -m benchmarks.curate_engines --rows 10000000 --engine local --rss-limit-gb 18   # how far it gets

The pool (--pool, made once and reused): tables of --per-table rows; captions from a small vocabulary with 5 %
boilerplate, 1 % planted exact image copies, random sizes and scores. Embeddings cycle through 32 random
vectors (zstd keeps the files small; no rule here reads them: SemDeDup is left out, it is measured by
benchmarks/curate.py --steps faiss). Rules: caption words, caption repeats, image size, exact duplicates,
CLIP-score top half: every kind of Ray step but SemDeDup's.
ray: a one-node cluster (`ray start --head --num-cpus C --object-store-memory B`, spilling to disk when full),
then `vlp data filter --engine ray --address`. Memory is sampled every 0.2 s for each process (the driver, each
Ray worker, the node's daemons): peak RSS, which counts the object-store pages a worker maps (shared, bounded
by --object-store-gb), and peak USS, the process's own memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--min-words", "2", "--min-side", "64", "--max-aspect", "3", "--dedup-image", "--top-fraction", "0.5",
         "--no-sheets", "--overwrite"]


def repeat_flags(rows: int) -> list[str]:
    """The pool draws captions from one 4,097-caption vocabulary, so a caption's count grows with the pool:
    the repeat cap grows with it (1,000 per million rows, at least 1,000) to remove the same share at every size."""
    return ["--max-caption-repeats", str(max(1000, rows // 1000))]
WORDS = "red blue green cat dog house tree car sky sun moon star big small old new photo of a the".split()


def make_pool(folder: Path, rows: int, per_table: int, dim: int) -> Path:
    import pyarrow.parquet as pq

    from vlp.curate.arrow_table import to_arrow

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "done.json").is_file() and json.loads((folder / "done.json").read_text())["rows"] == rows:
        return folder
    rng = np.random.default_rng(0)
    base = rng.normal(size=(32, dim)).astype(np.float16)
    vocab = np.array([" ".join(rng.choice(WORDS, k)) for k in rng.integers(1, 9, 4096)] + ["click to enlarge"])
    n_tables = -(-rows // per_table)
    for t in range(n_tables):
        n = min(per_table, rows - t * per_table)
        cap = vocab[np.where(rng.random(n) < 0.05, len(vocab) - 1, rng.integers(0, len(vocab) - 1, n))]
        h = rng.integers(0, 2**63, n)
        copies = rng.random(n) < 0.01
        h[copies] = rng.integers(0, 1000, copies.sum())          # planted exact copies: a few shared hashes
        arrays = {"key": np.char.add("k", np.arange(t * per_table, t * per_table + n).astype(str)),
                  "caption": cap, "width": rng.integers(32, 1024, n).astype(np.int32),
                  "height": rng.integers(32, 1024, n).astype(np.int32),
                  "image_hash": np.char.zfill(h.astype(str), 32), "valid": rng.random(n) > 0.01,
                  "image": base[np.arange(n) % 32], "text": base[(np.arange(n) + 7) % 32],
                  "score": rng.random(n).astype(np.float32)}
        pq.write_table(to_arrow(f"synthetic/{t:06d}.tar", arrays), folder / f"{t:06d}.parquet", compression="zstd")
        print(f"pool: table {t + 1}/{n_tables}", file=sys.stderr, flush=True)
    (folder / "model.json").write_text(json.dumps({"model": "synthetic", "fingerprint": "synthetic"}))
    (folder / "done.json").write_text(json.dumps({"shards": n_tables, "rows": rows}))
    return folder


class Sampler:
    """Peak RSS per process of the given process trees (and sessions), sampled every `period` s."""

    def __init__(self, roots: list[int], sessions: list[int] = (), period: float = 0.2, limit_mb: float = 0.0):
        self.roots, self.sessions, self.period = roots, list(sessions), period
        self.limit_mb, self.killed_at_mb = limit_mb, 0.0   # SIGKILL the first root above limit_mb of RSS
        self.peak: dict[str, float] = {}       # RSS: counts the object-store pages a worker maps
        self.peak_uss: dict[str, float] = {}   # USS: the process's own memory only
        self.peak_total = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _procs(self):
        import psutil

        seen = {}
        for r in self.roots:
            try:
                p = psutil.Process(r)
                for q in [p] + p.children(recursive=True):
                    seen[q.pid] = q
            except psutil.NoSuchProcess:
                pass
        if self.sessions:
            for q in psutil.process_iter():
                try:
                    if os.getsid(q.pid) in self.sessions:
                        seen[q.pid] = q
                except (ProcessLookupError, PermissionError):
                    pass
        return seen.values()

    def _run(self):
        while not self._stop.is_set():
            total = 0.0
            for q in self._procs():
                try:
                    m = q.memory_full_info()
                    name = f"{q.pid} {' '.join(q.cmdline())[:60]}"
                except Exception:  # noqa: BLE001 - a process that just ended
                    continue
                total += m.uss / 2**20
                self.peak[name] = max(self.peak.get(name, 0.0), m.rss / 2**20)
                self.peak_uss[name] = max(self.peak_uss.get(name, 0.0), m.uss / 2**20)
                if self.limit_mb and q.pid == self.roots[0] and m.rss / 2**20 > self.limit_mb:
                    self.killed_at_mb = m.rss / 2**20
                    q.kill()
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_filter(pool: Path, out: Path, engine: str, env: dict, address=None, sessions=(), limit_gb=0.0) -> dict:
    rows = json.loads((pool / "done.json").read_text())["rows"]
    cmd = [sys.executable, "-m", "vlp", "data", "filter", "--embeddings", str(pool), "--out", str(out), *FLAGS,
           *repeat_flags(rows)]
    if engine == "ray":
        cmd += ["--engine", "ray", "--address", address]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Sampler([p.pid], sessions, limit_mb=limit_gb * 1024) as s:
        stdout, stderr = p.communicate()
    wall = time.perf_counter() - t
    if s.killed_at_mb:
        return {"wall_s": round(wall, 1), "killed_at_rss_mb": round(s.killed_at_mb), "finished": False}
    if p.returncode:
        raise SystemExit(f"filter failed: {stderr[-3000:]}")
    mine = f"{p.pid} "
    out = {"wall_s": round(wall, 1)}
    for kind, peaks in (("rss", s.peak), ("uss", s.peak_uss)):
        others = [v for k, v in peaks.items() if not k.startswith(mine)]
        out[f"driver_peak_{kind}_mb"] = round(max(v for k, v in peaks.items() if k.startswith(mine)))
        out[f"max_worker_peak_{kind}_mb"] = round(max(others)) if others else None
    out["all_processes_peak_uss_mb"] = round(s.peak_total)
    out["steps"] = [x for x in stderr.splitlines() if x.startswith("[ray]")]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--per-table", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--engine", choices=("local", "ray"), default="ray")
    p.add_argument("--pool", help="folder of the synthetic pool (default: a temp folder per size)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--object-store-gb", type=float, default=2.0)
    p.add_argument("--rss-limit-gb", type=float, default=0.0,
                   help="local: stop the filter (SIGKILL) once its RSS passes this, and report how far it got")
    a = p.parse_args(argv)
    import tempfile

    from tests.ray_cluster import LocalCluster

    pool = make_pool(Path(a.pool or Path(tempfile.gettempdir()) / f"vlp_pool_{a.rows}"), a.rows, a.per_table, a.dim)
    out = Path(tempfile.mkdtemp(prefix="vlp_filter_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    row = {"engine": a.engine, "rows": a.rows, "dim": a.dim, "tables": len(list(pool.glob("*.parquet")))}
    if a.engine == "local":
        row.update(run_filter(pool, out / "f", "local", env, limit_gb=a.rss_limit_gb))
    else:
        c = LocalCluster(out, cpus=a.cpus, object_store=int(a.object_store_gb * 2**30))
        c.start(workers=0, timeout=300)
        try:
            row.update(run_filter(pool, out / "f", "ray", c.env, c.address, [n.pid for n in c.nodes]))
        finally:
            c.stop()
        row["object_store_gb"] = a.object_store_gb
        row["cpus"] = a.cpus
    if row.get("finished") is False:
        print(json.dumps(row, indent=1))
        return 0
    row["decisions_kept"] = sum(1 for x in (out / "f" / "decisions.tsv").open() if x.endswith("\t\n"))
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
