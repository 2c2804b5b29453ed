"""Loader throughput: vlp's train loader vs open_clip_train's webdataset pipeline, same shards, same run.

    python -m benchmarks.loader --samples 2000 --workers 4 --batch-size 64

Writes (or reuses, --shards) JPEG shards of web-size images (default 500x375, quality 90, a smooth
random scene plus noise so the JPEGs cost what photos cost to decode), then measures samples/s of
decoded, augmented 224-px training batches (RandomResizedCrop scale 0.9-1 bicubic, normalised float
tensors + tokenised captions) for both loaders over one epoch each, with the same worker count and batch
size, alternating for --rounds rounds and keeping each loader's best. "steady" excludes the time to the
first batch (worker start and shuffle-buffer fill); "total" includes it.

Then the same comparison over HTTP (unless --no-http): the shard folder is served by the standard
library's `http.server` on 127.0.0.1 in a separate process, both loaders are given the
`http://127.0.0.1:PORT/{00000..N}.tar` spec (vlp streams it with its own HTTP reader, vlp/data/transports.py,
open_clip_train with curl through webdataset's gopen; vlp reads sizes.json from the server, open_clip_train is
given --train-num-samples as it requires).

open_clip_train under webdataset 1.x needs the empty end-of-shard record dropped (reference.md); this
script patches that in for the comparison only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np


def write_bench_shards(out: Path, n: int, per_shard: int, width: int, height: int, seed: int = 0,
                       procs: int = 1) -> str:
    """`n` photo-like JPEGs (a smooth random scene plus noise, quality 90) with 5-15 word captions in shards of
    `per_shard`, plus sizes.json; `procs` processes write the shards in parallel (about 6 CPU-ms per 224 px image:
    61,440 images take 6 minutes in one process, under 30 s in 16)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), k, min(per_shard, n - k * per_shard), width, height, seed) for k in range(-(-n // per_shard))]
    if procs > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(procs, len(jobs))) as pool:
            done = pool.map(_write_one_shard, jobs)
    else:
        done = [_write_one_shard(j) for j in jobs]
    sizes = dict(done)
    (out / "sizes.json").write_text(json.dumps(sizes))
    return str(out / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def _write_one_shard(job) -> tuple[str, int]:
    import io

    from PIL import Image

    from vlp.data.tario import ShardWriter

    out, k, count, width, height, seed = job
    rng, pyrng = np.random.default_rng([seed, k]), random.Random(seed * 100003 + k)
    words = "a photo of the red blue small large dog cat car tree house street people beach sky on in with".split()
    with ShardWriter(str(Path(out) / "%05d.tar"), count, start_index=k) as w:
        for j in range(count):
            low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
            im = Image.fromarray(low).resize((width, height), Image.BICUBIC)
            noise = rng.normal(0, 12, (height, width, 3))
            arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            cap = " ".join(pyrng.choice(words) for _ in range(pyrng.randint(5, 15)))
            w.write(f"{k:05d}{j:06d}", {"jpg": buf.getvalue(), "txt": cap.encode(),
                                        "json": json.dumps({"caption": cap}).encode()})
        sizes = w.sizes
    return next(iter(sizes.items()))


def run_vlp(spec, preprocess, tokenizer, workers, batch_size):
    from vlp.config import DataConfig
    from vlp.data.pipeline import build_train_loader

    cfg = DataConfig(train_data=spec, batch_size=batch_size, workers=workers, shuffle_buffer=1000)
    loader = build_train_loader(cfg, preprocess, tokenizer, seed=0)
    return _time(loader, batch_size)


def run_open_clip(spec, preprocess, tokenizer, workers, batch_size, num_samples=None):
    import open_clip_train.data as ocd

    if not getattr(ocd, "_vlp_patched", False):
        orig = ocd.tar_file_expander

        def tar_file_expander(*a, **k):  # webdataset 1.x emits an empty record at each shard's end
            return (r for r in orig(*a, **k) if r and "fname" in r)

        ocd.tar_file_expander = tar_file_expander
        ocd._vlp_patched = True
    args = Namespace(train_data=spec, val_data=None, train_num_samples=num_samples, dataset_resampled=False,
                     train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=workers,
                     world_size=1)
    info = ocd.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    return _time(info.dataloader, batch_size)


@contextlib.contextmanager
def http_server(folder: str):
    """`python -m http.server` serving `folder` on 127.0.0.1 (its own process); yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def compare(label, specs, preprocess, tokenizer, a, num_samples=None) -> None:
    """Alternate the two loaders for --rounds rounds; print each round, the best of each and the ratio."""
    results = {"vlp": [], "open_clip_train": []}
    for r in range(a.rounds):
        for name in ("open_clip_train", "vlp"):
            if name == "vlp":
                res = run_vlp(specs[name], preprocess, tokenizer, a.workers, a.batch_size)
            else:
                res = run_open_clip(specs[name], preprocess, tokenizer, a.workers, a.batch_size, num_samples)
            results[name].append(res)
            print(f"{label} round {r}: {name:16s} {res['steady']:8.1f} samples/s steady, {res['total']:8.1f} total "
                  f"({res['samples']} samples, first batch {res['first_batch_s']:.2f}s)")
    best = {k: max(v, key=lambda x: x["steady"]) for k, v in results.items()}
    ratio = best["vlp"]["steady"] / best["open_clip_train"]["steady"]
    ratio_total = best["vlp"]["total"] / best["open_clip_train"]["total"]
    print(f"{label} vlp:             {best['vlp']['steady']:.1f} samples/s (total {best['vlp']['total']:.1f})")
    print(f"{label} open_clip_train: {best['open_clip_train']['steady']:.1f} samples/s "
          f"(total {best['open_clip_train']['total']:.1f})")
    print(f"{label} ratio vlp/open_clip_train: {ratio:.2f} steady, {ratio_total:.2f} total (target >= 2.0)")


def _time(loader, batch_size):
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for images, texts in loader:
        assert images.shape[1:] == (3, 224, 224) and images.dtype.is_floating_point
        n += images.shape[0]
        if t_first is None:
            t_first = time.perf_counter()
            n_first = n
    t1 = time.perf_counter()
    return {"samples": n, "total": n / (t1 - t0), "steady": (n - n_first) / max(t1 - t_first, 1e-9),
            "first_batch_s": t_first - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="existing shard spec (default: write synthetic web-size JPEG shards)")
    p.add_argument("--out", help="where to write the synthetic shards (default: a temp folder)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model whose tokenizer is used")
    p.add_argument("--no-http", action="store_true", help="skip the comparison over HTTP from 127.0.0.1")
    a = p.parse_args(argv)
    import open_clip
    from open_clip.transform import image_transform

    preprocess = image_transform(224, is_train=True)  # open_clip's train transform (RRC 0.9-1, bicubic)
    tokenizer = open_clip.get_tokenizer(a.model)
    tmp = None
    spec = a.shards
    if spec is None:
        out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="vlp_bench_"))
        t = time.time()
        spec = write_bench_shards(out, a.samples, a.per_shard, a.width, a.height)
        print(f"wrote {a.samples} {a.width}x{a.height} JPEGs to {spec} in {time.time() - t:.1f}s")
    print(f"setup: {os.cpu_count()} CPUs, workers={a.workers}, batch={a.batch_size}, {a.width}x{a.height} JPEG -> 224")
    compare("local", {"vlp": spec, "open_clip_train": spec}, preprocess, tokenizer, a)
    if not a.no_http:
        from vlp.data.shards import shard_urls

        urls = shard_urls(spec)
        folder = os.path.dirname(urls[0])
        names = [os.path.basename(u) for u in urls]
        stems = [n[:-4] for n in names]
        remote = f"{{{stems[0]}..{stems[-1]}}}.tar" if len(stems) > 1 else names[0]
        with http_server(folder) as base:
            n = sum(json.loads(open(os.path.join(folder, "sizes.json")).read()).get(nm, 0) for nm in names)
            compare("http", {"vlp": f"{base}/{remote}", "open_clip_train": f"{base}/{remote}"},
                    preprocess, tokenizer, a, num_samples=n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
