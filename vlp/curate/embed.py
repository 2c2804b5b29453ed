"""`vlp data embed`: image and text embeddings and their cosine for every sample of a shard spec.

    vlp data embed --data 'pool/{00000..00099}.tar' --checkpoint run/export --out pool_emb
    torchrun --nproc_per_node 8 -m vlp data embed --data ... --checkpoint ckpt.pt --out pool_emb   # 8 ranks
    vlp data embed --data ... --model ViT-B-32 --checkpoint open_clip_weights.pt --out pool_emb

Shards are read by the one sample reader (`vlp.data.tario`: local, `pipe:`, http(s) and fsspec shards) and
encoded by the evaluator's encoder (`vlp.eval.encode`), so curation scores samples exactly as evaluation
does. Under torchrun (or `accelerate launch`, on any number of nodes) rank r of W takes shards r, r+W, ...
Each shard's table is written when the shard is done (`vlp.curate.store`), so a killed run resumes at the
first shard without one; the last rank to finish writes `done.json`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from vlp.curate.shard_encoder import embed_shard, load_model
from vlp.curate.store import (DONE_FILE, LEGACY, CurateError, atomic_write, check_model, table_path, table_shard,
                              write_table)
from vlp.flags import Parser


def prepare(data: str, out: str, bundle) -> list[str]:
    """The shard URLs of `data`; `out` recorded as (or checked to be) this model's folder."""
    from vlp.data.shards import shard_urls
    from vlp.eval.features import model_fingerprint

    urls = shard_urls(data)
    if not urls:
        raise CurateError(f"--data {data!r} names no shards")
    check_model(Path(out), {"model": bundle.model_name, "fingerprint": model_fingerprint(bundle.model),
                            "data": data, "shards": len(urls)})
    return urls


def embed(data: str, out: str, bundle, *, batch_size: int = 256, device="cpu", amp: bool = False,
          rank: int = 0, world: int = 1, log=print) -> dict:
    """Embed this rank's shards of `data` into `out`, skipping shards whose table is already there."""
    urls = prepare(data, out, bundle)
    folder = Path(out)
    done = skipped = samples = 0
    t0 = time.perf_counter()
    for i in range(rank, len(urls), world):
        path = table_path(folder, i)
        if urls[i] in (table_shard(path), table_shard(table_path(folder, i, LEGACY))):
            skipped += 1   # written by an earlier run (a damaged or another shard's table is embedded again)
            continue
        t = time.perf_counter()
        table = embed_shard(bundle, urls[i], batch_size, device, amp)
        write_table(path, urls[i], table)
        table_path(folder, i, LEGACY).unlink(missing_ok=True)   # an earlier (damaged or stale) .npz table
        done += 1
        samples += len(table["key"])
        log(f"[rank {rank}/{world}] {path.name} <- {urls[i]}: {len(table['key'])} samples "
            f"({int(table['valid'].sum())} valid), {len(table['key']) / (time.perf_counter() - t):.1f} samples/s")
    return {"embedded": done, "resumed": skipped, "samples": samples, "seconds": time.perf_counter() - t0,
            "shards": len(urls)}


def _finish(folder: Path, n_shards: int) -> bool:
    """Write done.json once every shard's table is there (whichever rank sees that first)."""
    have = [table_path(folder, i).is_file() or table_path(folder, i, LEGACY).is_file() for i in range(n_shards)]
    if all(have):
        atomic_write(folder / DONE_FILE, lambda f: f.write(json.dumps({"shards": n_shards}).encode()))
    return all(have)


def hold_folder(out: str, main_process: bool, broadcast=None):
    """The lock of --out (`OUT/.lock`), taken by the main process; -> (lock or None, error line or None).
    `broadcast` passes the main process's answer to the other ranks, so a refused job stops on every rank."""
    from vlp.runtime.lock import FolderLock

    lock, error = None, None
    if main_process:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            lock = FolderLock(Path(out) / ".lock")
            holder = lock.take()
        except OSError as e:
            holder, error = None, f"cannot write --out {out}: {e.strerror or e}"
        if holder:
            error = f"{out} is in use by another `vlp data embed` ({holder}): wait for it to end or use another --out"
    if broadcast is not None:
        error = broadcast(error)
    return lock, error


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="shard spec, as --train-data")
    p.add_argument("--out", required=True, help="folder for the per-shard tables")
    p.add_argument("--checkpoint", "--pretrained", dest="checkpoint", help="vlp checkpoint/export or open_clip file")
    p.add_argument("--model", help="open_clip model name or JSON config (for open_clip files; alone: random weights, seed 0)")
    p.add_argument("--tokenizer", help="hf:DIR or spm:FILE (default: the model's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast")
    p.add_argument("--threads", type=int, help="torch threads (CPU)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (or torchrun's ranks); ray: an actor pool on a Ray cluster")
    p.add_argument("--address", help="--engine ray: the cluster (HOST:PORT or auto; default: a local Ray)")
    p.add_argument("--actors", type=int, help="--engine ray: actors (default: one per GPU; 1 on CPU)")
    a = p.parse_args(argv)
    if a.engine == "ray":
        return _main_ray(a)
    from accelerate import PartialState

    from vlp.config import ConfigError
    from vlp.data.errors import DataError
    from vlp.eval.datasets import EvalError

    import torch

    # torchrun / accelerate launch: one rank per process, any number of nodes; cpu=True where there is no CUDA
    # (accelerate then sets up gloo ranks, as the training loop does)
    state = PartialState(cpu=not torch.cuda.is_available())
    if a.threads:
        torch.set_num_threads(a.threads)
    lock, error = hold_folder(a.out, state.is_main_process,
                              _broadcast if state.num_processes > 1 else None)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        bundle = load_model(a.checkpoint, a.model, a.tokenizer, state.device)
        stats = embed(a.data, a.out, bundle, batch_size=a.batch_size, device=state.device, amp=a.amp,
                      rank=state.process_index, world=state.num_processes,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    except (CurateError, ConfigError, DataError, EvalError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    state.wait_for_everyone()
    complete = _finish(Path(a.out), stats["shards"]) if state.is_main_process else True
    if lock is not None:
        lock.release()
    print(f"rank {state.process_index}: embedded {stats['embedded']} shards ({stats['samples']} samples, "
          f"{stats['samples'] / max(stats['seconds'], 1e-9):.1f} samples/s), {stats['resumed']} already done"
          + ("" if complete else "; some shards are missing: run again to finish"), flush=True)
    return 0


def _main_ray(a) -> int:
    from vlp.config import ConfigError
    from vlp.data.errors import DataError
    from vlp.eval.datasets import EvalError

    lock, error = hold_folder(a.out, True)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        from vlp.curate.ray_embed import embed_on_ray

        model_args = {"checkpoint": a.checkpoint, "model": a.model, "tokenizer": a.tokenizer}
        urls = prepare(a.data, a.out, load_model(device="cpu", **model_args))
        stats = embed_on_ray(urls, a.out, model_args, address=a.address, actors=a.actors,
                             batch_size=a.batch_size, threads=a.threads, amp=a.amp,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
        complete = _finish(Path(a.out), len(urls))
    except ImportError as e:
        print(f"error: --engine ray needs Ray Data: pip install 'vlp[ray]' ({e})", file=sys.stderr)
        return 2
    except (CurateError, ConfigError, DataError, EvalError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    print(f"ray: embedded {stats['embedded']} shards ({stats['samples']} samples, "
          f"{stats['samples'] / max(stats['seconds'], 1e-9):.1f} samples/s), {stats['resumed']} already done"
          + ("" if complete else "; some shards are missing: run again to finish"), flush=True)
    return 0


def _broadcast(value):
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


if __name__ == "__main__":
    sys.exit(main())
