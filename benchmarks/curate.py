"""Curation at scale: cost per sample and memory of each step, and `vlp data embed` against clip-retrieval.

    python -m benchmarks.curate --steps embed faiss           # vlp-tiny + ViT-B-32 embedding; faiss on 1M x 512
    python -m benchmarks.curate --steps faiss --n 1000000 --clusters 1000
    python -m benchmarks.curate --steps peer --peer-python cr_env/bin/python --peer-data 'pool/{00000..00001}.tar' \
        --peer-checkpoint run/export       # the same shards, model and batch through clip-retrieval's inference

embed: samples/s of `vlp.curate.shard_encoder.embed_shard` (the code `vlp data embed` runs) on CPU with random weights,
on a shard of demo images, one thread unless --threads. faiss: on --n synthetic 512-d unit embeddings (clustered,
with 10 % planted near-copies), seconds and peak memory of faiss's spherical k-means (trained as SemDeDup trains
it: at most 256 points per centroid), of assigning every row (a flat index search), and of the whole SemDeDup
rule; plus exact-duplicate hashing. peer: clip-retrieval `inference` (installed in its own environment; pass its
python) on the same shards, model and batch size, wall seconds of each tool's whole command and the largest
difference between their embeddings (float16 on both sides).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_embed(models: list[str], n: int, threads: int) -> list[dict]:
    import torch

    from data_tools.make_demo_data import make_demo_data
    from vlp.curate.shard_encoder import embed_shard, load_model
    from vlp.data.shards import shard_urls

    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        spec = make_demo_data(d, train_samples=n, eval_samples=8, image_size=96, per_shard=max(8, n // 8),
                              progress=False)
        urls = shard_urls(spec["train_data"])
        for name in models:
            bundle = load_model(None, name, None, "cpu")
            mine = urls[:1] if "B-32" in name or "B-16" in name else urls   # the big towers: an eighth
            embed_shard(bundle, urls[0], batch_size=64)   # warm-up (allocations, caches)
            t = time.perf_counter()
            count = sum(len(embed_shard(bundle, u, batch_size=64)["key"]) for u in mine)
            s = time.perf_counter() - t
            dim = int(bundle.model.text_projection.shape[-1]) if hasattr(bundle.model, "text_projection") else 0
            rows.append({"step": f"embed {name} (CPU, {threads} thread)", "samples": count, "seconds": round(s, 2),
                         "samples_per_s": round(count / s, 1), "peak_rss_mb": round(peak_mb()),
                         "table_bytes_per_sample": 2 * 2 * dim + 60})
    return rows


def synthetic(n: int, d: int, seed: int = 0, centers: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d), dtype=np.float32)
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, d), dtype=np.float32)
    dup = rng.choice(n, n // 10, replace=False)
    x[dup] = x[rng.integers(0, n, len(dup))] + 0.01 * rng.standard_normal((len(dup), d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_faiss(n: int, d: int, clusters: int, eps: float) -> list[dict]:
    import faiss

    from vlp.curate import dedup as D
    from vlp.curate.store import Table

    rows = []
    t = time.perf_counter()
    x = synthetic(n, d)
    rows.append({"step": f"synthetic {n} x {d}", "seconds": round(time.perf_counter() - t, 1),
                 "array_mb": round(x.nbytes / 2**20), "peak_rss_mb": round(peak_mb())})
    km = faiss.Kmeans(d, clusters, niter=20, seed=0, spherical=True, min_points_per_centroid=1)
    t = time.perf_counter()
    km.train(x)
    rows.append({"step": f"faiss k-means k={clusters} (train on {min(n, 256 * clusters)} points)",
                 "seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak_mb())})
    t = time.perf_counter()
    km.index.search(x, 1)
    s = time.perf_counter() - t
    rows.append({"step": f"faiss assign {n} rows (IndexFlatIP, {clusters} centroids)", "seconds": round(s, 1),
                 "us_per_sample": round(1e6 * s / n, 2), "peak_rss_mb": round(peak_mb())})
    table = Table(shard=np.full(n, "s", dtype=object), key=np.arange(n).astype(str), caption=np.full(n, "c"),
                  width=np.zeros(n, np.int32), height=np.zeros(n, np.int32),
                  image_hash=np.random.default_rng(1).integers(0, n, n).astype(str), valid=np.ones(n, bool),
                  image=x.astype(np.float16), text=x[:1].astype(np.float16), score=np.zeros(n, np.float32))
    del x
    t = time.perf_counter()
    removed = D.semdedup(eps, clusters)(table, table.valid.copy())
    s = time.perf_counter() - t
    rows.append({"step": f"SemDeDup rule (k-means + within-cluster cosine > {1 - eps})", "seconds": round(s, 1),
                 "us_per_sample": round(1e6 * s / n, 2), "removed": int(removed.sum()), "peak_rss_mb": round(peak_mb())})
    t = time.perf_counter()
    D.exact("image")(table, table.valid.copy())
    s = time.perf_counter() - t
    rows.append({"step": "exact duplicates (image hash)", "seconds": round(s, 1), "us_per_sample": round(1e6 * s / n, 2),
                 "peak_rss_mb": round(peak_mb())})
    return rows


_PEER = """
import sys, time
import vlp.models  # registers vlp's model configs (vlp-tiny, vlp-icon) with open_clip
from clip_retrieval.clip_inference.main import main
if __name__ == "__main__":
    main(input_dataset=sys.argv[1], output_folder=sys.argv[2], input_format="webdataset", enable_metadata=True,
         clip_model=sys.argv[3], use_jit=False, batch_size=int(sys.argv[4]), num_prepro_workers=1,
         wds_image_key="jpg", wds_caption_key="txt", output_partition_count=None, write_batch_size=10 ** 7)
"""


def bench_peer(python: str, data: str, checkpoint: str, batch: int, threads: int) -> list[dict]:
    """Both tools' whole commands on the same shards, model weights and batch size; then their embeddings."""
    import pandas as pd

    from vlp.curate.store import load_tables

    weights = Path(checkpoint) / "open_clip_model.safetensors"
    model = json.loads((Path(checkpoint) / "open_clip_config.json").read_text()).get("model_name", "vlp-icon")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vlp", "data", "embed", "--data", data, "--checkpoint", checkpoint,
                        "--out", f"{d}/vlp", "--batch-size", str(batch), "--threads", str(threads)], env=env,
                       check=True, capture_output=True)
        vs = time.perf_counter() - t
        script = Path(d) / "peer.py"
        script.write_text(_PEER)
        t = time.perf_counter()
        subprocess.run([python, str(script), data, f"{d}/cr", f"open_clip:{model}/{weights}", str(batch)], env=env,
                       check=True, capture_output=True)
        cs = time.perf_counter() - t
        tab = load_tables(f"{d}/vlp")
        meta = pd.read_parquet(sorted(Path(d, "cr", "metadata").glob("*.parquet"))[0])
        img = np.load(sorted(Path(d, "cr", "img_emb").glob("*.npy"))[0]).astype(np.float32)
        txt = np.load(sorted(Path(d, "cr", "text_emb").glob("*.npy"))[0]).astype(np.float32)
        pos = {k: i for i, k in enumerate(tab.key)}
        idx = [pos[k] for k in meta["key"]]
        n = len(tab)
        rows.append({"step": "embed: vlp data embed", "samples": n, "seconds": round(vs, 1),
                     "samples_per_s": round(n / vs, 1)})
        rows.append({"step": "embed: clip-retrieval inference", "samples": len(meta), "seconds": round(cs, 1),
                     "samples_per_s": round(len(meta) / cs, 1), "vlp_speedup": round(cs / vs, 2),
                     "max_abs_diff_image": float(np.abs(img - tab.image[idx].astype(np.float32)).max()),
                     "max_abs_diff_text": float(np.abs(txt - tab.text[idx].astype(np.float32)).max())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--steps", nargs="+", default=["embed", "faiss"], choices=("embed", "faiss", "peer"))
    p.add_argument("--models", nargs="+", default=["vlp-tiny", "ViT-B-32"])
    p.add_argument("--samples", type=int, default=512, help="embedding samples (ViT-B-32: a 16th of them)")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peer-python", help="python of an environment with clip-retrieval")
    p.add_argument("--peer-data", help="webdataset shards (jpg + txt) for the peer comparison")
    p.add_argument("--peer-checkpoint", help="a vlp export folder (open_clip config + safetensors)")
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import faiss

    faiss.omp_set_num_threads(a.threads)
    rows = []
    if "embed" in a.steps:
        rows += bench_embed(a.models, a.samples, a.threads)
    if "faiss" in a.steps:
        rows += bench_faiss(a.n, a.dim, a.clusters, a.eps)
    if "peer" in a.steps:
        rows += bench_peer(a.peer_python, a.peer_data, a.peer_checkpoint, a.batch_size, a.threads)
    for r in rows:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
