"""`vlp data embed --engine ray`: shards encoded by a Ray actor pool, one table per shard as the single-process
embed writes it.

    vlp data embed --engine ray --address HEAD:6379 --data 'pool/{00000..09999}.tar' --checkpoint ckpt.pt \
        --out /shared/pool_emb            # one actor per GPU of the cluster; --actors N on CPU

Each actor loads the model once and embeds whole shards with `vlp.curate.shard_encoder.embed_shard` (vlp's own sample
reader: every transport, skip rule and count as in one process), writing the shard's table atomically into
--out, which every node must reach (a shared file system). The driver only lists the shards still to do
(a missing or damaged table, resumable per shard as today), reports progress and writes done.json.
"""
from __future__ import annotations

import time
from pathlib import Path

from vlp.curate.store import LEGACY, table_path, table_shard, write_table


class ShardEncoder:
    """A Ray Data actor: the model, loaded once; a batch of shard indices in, their tables written out."""

    def __init__(self, out: str, urls: list[str], model_args: dict, batch_size: int, threads: int, amp: bool):
        import torch

        from vlp.curate.shard_encoder import load_model

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = load_model(device=self.device, **model_args)
        self.out, self.urls, self.batch_size, self.amp = Path(out), urls, batch_size, amp

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from vlp.curate.shard_encoder import embed_shard

        from vlp.curate.store import CurateError
        from vlp.data.errors import DataError

        samples, valid, seconds, errors = [], [], [], []
        for i in batch["index"].tolist():
            t = time.perf_counter()
            try:
                table = embed_shard(self.bundle, self.urls[i], self.batch_size, self.device, self.amp)
            except (CurateError, DataError) as e:   # bad input: the driver stops with this one line
                samples.append(0), valid.append(0), seconds.append(0.0), errors.append(str(e).splitlines()[0])
                continue
            write_table(table_path(self.out, i), self.urls[i], table)
            table_path(self.out, i, LEGACY).unlink(missing_ok=True)
            samples.append(len(table["key"]))
            valid.append(int(table["valid"].sum()))
            seconds.append(time.perf_counter() - t)
            errors.append("")
        return {"index": batch["index"], "samples": np.array(samples), "valid": np.array(valid),
                "seconds": np.array(seconds), "error": np.array(errors, dtype=object)}


def embed_on_ray(urls: list[str], out: str, model_args: dict, *, address=None, actors=None, batch_size=256,
                 threads=None, amp=False, log=print) -> dict:
    """Embed the shards of `urls` without a good table in `out` on a Ray actor pool; -> embed()'s stats."""
    import ray

    from vlp.curate.ray_filter import connect
    from vlp.curate.store import CurateError

    folder = Path(out)
    todo = [i for i, u in enumerate(urls)
            if u not in (table_shard(table_path(folder, i)), table_shard(table_path(folder, i, LEGACY)))]
    stats = {"embedded": 0, "resumed": len(urls) - len(todo), "samples": 0, "shards": len(urls)}
    t0 = time.perf_counter()
    if not todo:
        return {**stats, "seconds": 0.0}
    connect(address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = actors or gpus or 1
        log(f"[ray] {len(todo)} shards to embed on {n} actor(s) ({'1 GPU each' if gpus else 'CPU'})")
        ds = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=len(todo))
        done = ds.map_batches(ShardEncoder, batch_size=1, batch_format="numpy", concurrency=n,
                              num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                              fn_constructor_kwargs={"out": str(folder), "urls": urls, "model_args": model_args,
                                                     "batch_size": batch_size, "threads": threads, "amp": amp})
        for b in done.iter_batches(batch_format="numpy", batch_size=1):
            i = int(b["index"][0])
            if b["error"][0]:
                raise CurateError(b["error"][0])
            stats["embedded"] += 1
            stats["samples"] += int(b["samples"][0])
            log(f"[ray {stats['embedded']}/{len(todo)}] {table_path(folder, i).name} <- {urls[i]}: "
                f"{int(b['samples'][0])} samples ({int(b['valid'][0])} valid), "
                f"{b['samples'][0] / max(float(b['seconds'][0]), 1e-9):.1f} samples/s")
    except ray.exceptions.RayError as e:
        raise CurateError(f"the Ray run failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); "
                          f"the shards done are kept: run again to finish") from None
    finally:
        ray.shutdown()
    return {**stats, "seconds": time.perf_counter() - t0}
