"""Training-step throughput: vlp against open_clip_train, same model, weights, batches and threads.

    .venv/bin/python benchmarks/train_step.py                 # vlp-tiny on CPU: ~30 s idle, <2 min loaded
    .venv/bin/python benchmarks/train_step.py --model vlp-tiny,ViT-B-32 --precision fp32,bf16   # a sweep
    .venv/bin/python benchmarks/train_step.py --train-data '/tmp/bench_demo/train/{00000..00001}.tar' \
        --batch-size 64 --steps 2 --warmup 2 --repeats 12 --threads 1 --accum-freq 2 --json out.json

What is timed is the optimiser step, not data loading. A fixed set of batches is decoded once
from demo shards (images through the model's train transform, captions through its tokenizer)
and the identical in-memory batches, in the same order, are fed to

  vlp              `vlp.train.trainer.Trainer.step`, the object `vlp.train.loop.train` drives: accelerate's
                   `Accelerator` (autocast, backward, no_sync), `vlp.train.parallelize`, `vlp.train.step.train_step`,
                   the loss of `vlp.losses.build_loss`, the end-of-step check (finite loss and gradient norm,
                   agreed by every rank), `build_optimizer` (AdamW) and `build_scheduler` (LambdaLR),
                   `zero_grad(set_to_none=True)`, `clamp_logit_scale`;
  open_clip_train  its own `train_one_epoch` with `args` from `open_clip_train.params.parse_args`,
                   `open_clip.create_loss(args)` (ClipLoss), AdamW with the param groups of its
                   main.py, its `cosine_lr` scheduler and GradScaler rule, the model built with
                   `create_model_and_transforms(..., output_dict=True)` as main.py does.

Both models hold the same initial weights (one state dict loaded into each; the initial loss is
printed for both as a check). `--warmup` steps of each are run first and not timed; then
`--repeats` rounds run `--steps` optimiser steps of each, alternating which goes first, and every
step is timed (wall clock and this process's CPU time; open_clip_train's steps are delimited by
when `train_one_epoch` asks its loader for the next batch). Reported per contender:
  samples/s          batch x accum-freq / median step time (the headline; robust to load spikes)
  best step          from the fastest step
  rounds             each round's samples/s
  ratios             vlp / open_clip_train of the medians; "paired": median over rounds of the two
                     back-to-back round times; "CPU-time": from median CPU time per step, which
                     hardly moves with other processes' load when --threads 1 (with more threads it
                     also counts OpenMP spin-waiting).
On a shared 2-core machine, OpenMP with 2 threads is slowed 2-10x whenever another process takes a
core; round rates that vary more than 1.5x are flagged. `--threads 1` gives steadier comparisons.
vlp's loop also logs every `--log-every` steps (a `.item()` and a JSON line): left out here, as
open_clip_train's logging is (silent with no logging handler, apart from its `.item()` calls at the
first and last step of each `train_one_epoch` call, which stay in).

`--model` and `--precision` take comma-separated lists: the comparison runs for every (model,
precision) pair, and a summary table closes the output.

The GPU benchmark (ViT-B-32/B-16 in bf16: compute-only ceiling, end to end, MFU) is benchmarks/gpu.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# open_clip's precision names, which vlp's --precision shares (vlp/precision.py): both sides get the same one.
PRECISIONS = ("fp32", "amp_bf16", "amp", "bf16", "fp16", "pure_bf16", "pure_fp16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vlp-tiny",
                   help="open_clip model name or JSON model config (the CPU comparison); comma-separated: a sweep")
    p.add_argument("--train-data", default=None,
                   help="shards to decode batches from (brace/glob pattern or folder); default: demo shards "
                        "written to a temporary folder")
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch size")
    p.add_argument("--steps", type=int, default=2, help="timed optimiser steps per round (per contender)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps before timing")
    p.add_argument("--repeats", type=int, default=12, help="timed rounds, alternating which contender goes first")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads")
    p.add_argument("--accum-freq", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--precision", default="fp32",
                   help=f"--precision of both ({', '.join(PRECISIONS)}); comma-separated: a sweep")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--distinct-batches", type=int, default=8, help="batches decoded once, then cycled")
    p.add_argument("--device", default="cpu", help="device of the model comparison (cpu or cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile a few steps of each with torch.profiler and print the top ops")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def _read_pairs(paths: list[str], n: int):
    """The first n usable (image, caption) pairs of the shards, in order, read and decoded as vlp reads them."""
    from vlp.data.errors import SkipSample
    from vlp.data.images import decode_rgb
    from vlp.data.tario import read_shard

    got = 0
    for path in paths:
        for s in read_shard(path):
            try:
                if s.image is None:
                    continue
                pair = decode_rgb(s.image), s.caption()
            except SkipSample:
                continue
            yield pair
            got += 1
            if got == n:
                return


def decode_batches(spec: str, preprocess, tokenizer, batch_size: int, n_batches: int) -> list[tuple]:
    from vlp.data.errors import DataError
    from vlp.data.shards import shard_urls

    try:
        paths = shard_urls(spec)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    pairs = list(_read_pairs(paths, batch_size * n_batches))
    if len(pairs) < batch_size:
        raise SystemExit(f"error: {spec} holds {len(pairs)} samples, fewer than one batch of {batch_size}")
    batches = []
    for i in range(0, len(pairs) - batch_size + 1, batch_size):
        chunk = pairs[i:i + batch_size]
        images = torch.stack([preprocess(img) for img, _ in chunk])
        texts = tokenizer([t for _, t in chunk])
        batches.append((images.contiguous(), texts.contiguous()))
    return batches


from benchmarks.step_runners import (_Stream, build_runners, paired_ratio, profile_pair,  # noqa: E402
                                     spread, summarise, time_pair)


# ----------------------------------------------------------------------------- main

def compare(a, model: str, precision: str) -> dict:
    """The CPU (or --device) comparison for one model and precision; prints its section."""
    from vlp.models import create_model

    torch.manual_seed(a.seed)  # the train transform's random crops
    tmp = None
    spec = a.train_data
    if spec is None:
        from data_tools.make_demo_data import make_demo_data

        tmp = tempfile.TemporaryDirectory(prefix="vlp_bench_")
        n = max(a.batch_size * a.distinct_batches, 64)
        spec = make_demo_data(tmp.name, train_samples=n, eval_samples=8, per_shard=max(n, 1000),
                              progress=False)["train_data"]
    bundle = create_model(model)
    batches = decode_batches(spec, bundle.preprocess_train, bundle.tokenizer, a.batch_size,
                             max(a.distinct_batches, a.accum_freq))
    del bundle
    if tmp is not None:
        tmp.cleanup()

    total_steps = a.warmup + a.steps * a.repeats + (3 if a.profile else 0)
    vlp_r, oc_r = build_runners(model, batch_size=a.batch_size, accum_freq=a.accum_freq, precision=precision,
                                compile_=a.compile, total_steps=total_steps, device=a.device, seed=a.seed)
    runners = [vlp_r, oc_r]
    init = {r.name: r.initial_loss(*batches[0]) for r in runners}
    streams = {r.name: _Stream(batches) for r in runners}
    samples_per_step = a.batch_size * a.accum_freq
    times = time_pair(runners, streams, steps=a.steps, warmup=a.warmup, repeats=a.repeats)
    if a.profile:
        profile_pair(runners, streams)
    summary = {k: summarise(v, samples_per_step, a.steps) for k, v in times.items()}
    med = {k: v["median_step"] for k, v in summary.items()}
    ratio = med["vlp"] / med["open_clip_train"]
    result = {
        "config": {"model": model, "device": a.device, "batch_size": a.batch_size, "accum_freq": a.accum_freq,
                   "samples_per_step": samples_per_step, "precision": precision, "compile": a.compile,
                   "threads": a.threads, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
                   "distinct_batches": len(batches), "train_data": a.train_data or "demo shards (temporary)",
                   "torch": torch.__version__},
        "initial_loss": init,
        "summary": summary,
        "step_s": {k: v["step_s"] for k, v in times.items()},
        "samples_per_s": med,
        "ratio": ratio,
        "paired_ratio": paired_ratio(times),
    }
    del runners, vlp_r, oc_r

    c = result["config"]
    print("\n== training step: vlp vs open_clip_train ==")
    print(f"config: model={Path(c['model']).name} device={c['device']} batch={c['batch_size']} "
          f"accum_freq={c['accum_freq']} precision={c['precision']} compile={c['compile']} threads={c['threads']} "
          f"steps={c['steps']}x{c['repeats']} (+{c['warmup']} warm-up) distinct_batches={c['distinct_batches']} "
          f"torch={c['torch']}")
    print(f"initial loss (same weights, same batch): vlp {init['vlp']:.6f} | open_clip_train "
          f"{init['open_clip_train']:.6f}")
    for k, v in summary.items():
        print(f"  {k:16s} median step {1e3 * statistics.median(times[k]['step_s']):.0f} ms wall, "
              f"{1e3 * statistics.median(times[k]['step_cpu_s']):.0f} ms CPU; best step {v['best_step']:.1f} samples/s; "
              f"rounds (samples/s): " + " ".join(f"{x:.0f}" for x in v["rounds"]))
    worst = max(spread(v["rounds"]) for v in summary.values())
    if worst > 1.5:
        print(f"WARNING: round rates vary {worst:.1f}x: the machine's load changed during the run; the paired "
              f"ratio and best-step figures are the more reliable (or rerun on a quieter machine / fewer --threads)")
    sv, so = summary["vlp"], summary["open_clip_train"]
    result["cpu_time_ratio"] = sv["median_step_cpu"] / so["median_step_cpu"]
    print(f"best-step ratio: {sv['best_step'] / so['best_step']:.3f} | "
          f"paired ratio (median over rounds run back to back): {result['paired_ratio']:.3f} | "
          f"CPU-time ratio (samples per CPU-second): {result['cpu_time_ratio']:.3f}")
    print("(samples/s below: batch x accum-freq / median step time over all timed steps)")
    print(f"vlp: {med['vlp']:.1f} samples/s | open_clip_train: {med['open_clip_train']:.1f} samples/s | "
          f"ratio: {ratio:.3f}")
    return result


def _list(spec: str) -> list[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    import logging

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    precisions = _list(a.precision)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise SystemExit(f"error: --precision {','.join(bad)}: choose from {', '.join(PRECISIONS)}")
    sweep = [compare(a, m, p) for m in _list(a.model) for p in precisions]
    result = sweep[0] if len(sweep) == 1 else {"sweep": sweep}
    if len(sweep) > 1:
        print("\n== sweep summary (samples/s from the median step) ==")
        print(f"{'model':>20s} {'precision':>9s} {'vlp':>9s} {'open_clip':>9s} {'ratio':>6s} {'paired':>6s}")
        for r in sweep:
            c, sps = r["config"], r["samples_per_s"]
            print(f"{Path(c['model']).name:>20s} {c['precision']:>9s} {sps['vlp']:9.1f} {sps['open_clip_train']:9.1f} "
                  f"{r['ratio']:6.3f} {r['paired_ratio']:6.3f}")

    result["wall_s"] = time.perf_counter() - t_start
    print(f"\n(total {result['wall_s']:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
