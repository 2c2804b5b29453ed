"""Training-step throughput: vlp against open_clip_train, same model, weights, batches and threads.

    .venv/bin/python benchmarks/train_step.py                 # vlp-tiny on CPU: ~30 s idle, <2 min loaded
    .venv/bin/python benchmarks/train_step.py --model vlp-tiny,ViT-B-32 --precision fp32,bf16   # a sweep
    .venv/bin/python benchmarks/train_step.py --train-data '/tmp/bench_demo/train/{00000..00001}.tar' \
        --batch-size 64 --steps 2 --warmup 2 --repeats 12 --threads 1 --accum-freq 2 --json out.json

What is timed is the optimiser step, not data loading. A fixed set of batches is decoded once
from demo shards (images through the model's train transform, captions through its tokenizer)
and the identical in-memory batches, in the same order, are fed to

  vlp              the step exactly as `vlp.train.loop.train` runs it: accelerate's `Accelerator`
                   (prepare, autocast, backward, no_sync), `vlp.train.step.train_step`, the loss of
                   `vlp.losses.build_loss`, the finite-loss check, `build_optimizer` (AdamW) and
                   `build_scheduler` (LambdaLR), `zero_grad(set_to_none=True)`, `clamp_logit_scale`;
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

With CUDA (and unless `--no-gpu`), a second section times both for each `--gpu-model` (ViT-B-32,
ViT-B-16; `--gpu-batch-size` one per model, or one for all) in bf16 (mixed precision: fp32 weights
under bf16 autocast, open_clip's `amp_bf16`), on random image and token tensors already on the GPU,
and reports samples/s and MFU:
  MFU = samples/s * 3 * forward FLOPs per sample / peak dense bf16 FLOP/s of the GPU,
with the forward FLOPs and the peak from `vlp.train.telemetry` (`flops_per_sample`, `peak_flops`:
the same figures as the trainer's perf/mfu), or `--peak-tflops`.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
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
    p.add_argument("--no-gpu", action="store_true", help="skip the CUDA section even if CUDA is available")
    p.add_argument("--gpu-model", default="ViT-B-32,ViT-B-16", help="comma-separated")
    p.add_argument("--gpu-batch-size", default="1024,512",
                   help="comma-separated, one per --gpu-model (or one for all): the largest that fits")
    p.add_argument("--gpu-steps", type=int, default=10)
    p.add_argument("--gpu-warmup", type=int, default=3)
    p.add_argument("--gpu-repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak dense bf16 TFLOP/s")
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


class _Stream:
    """An endless, deterministic cycle over the fixed batches; each runner owns one."""

    def __init__(self, batches):
        self._it = itertools.cycle(batches)

    def take(self, n: int) -> list:
        return [next(self._it) for _ in range(n)]


# ----------------------------------------------------------------------------- the two contenders

def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): CPU time barely moves with other processes' load."""
    return time.perf_counter(), time.process_time()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class VlpRunner:
    """vlp's optimiser step, line for line as `vlp.train.loop.train` runs it (logging left out)."""

    name = "vlp"

    def __init__(self, model_name: str, state: dict, *, batch_size: int, accum_freq: int, precision: str,
                 compile_: bool, total_steps: int, device: str, seed: int):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        from vlp import precision as prec
        from vlp.config import Config, validate
        from vlp.losses import build_loss, clamp_logit_scale, prepare_model_for_loss
        from vlp.models import create_model
        from vlp.train.optim import build_optimizer, build_scheduler
        from vlp.train.device_batch import DeviceBatch
        from vlp.train.step import train_step

        cfg = Config()
        cfg.model.model = model_name
        cfg.model.torchcompile = compile_
        cfg.data.batch_size = batch_size
        cfg.optim.accum_freq = accum_freq
        cfg.optim.max_steps = total_steps
        cfg.optim.warmup = max(1, total_steps // 4)
        cfg.run.precision = precision
        cfg.run.seed = seed
        validate(cfg)
        self.cfg = cfg

        # One process may build several Accelerators (CPU section, then GPU section): start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(mixed_precision=prec.accelerate_mixed_precision(precision),
                                  cpu=torch.device(device).type == "cpu")
        bundle = create_model(model_name)
        model = bundle.model
        model.load_state_dict(state)
        prepare_model_for_loss(model, cfg.loss)
        prec.cast_model(model, precision)  # open_clip's bf16/fp16/pure_*: 16-bit weights
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps=total_steps, steps_per_epoch=total_steps)
        if cfg.model.torchcompile:
            model = torch.compile(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        self.loss_fn = build_loss(cfg.loss, rank=accelerator.process_index, world_size=accelerator.num_processes)
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self._train_step, self._clamp = train_step, clamp_logit_scale
        self.to_device = DeviceBatch(accelerator.device, None, prec.compute_dtype(precision), prec.input_dtype(precision))
        self.device = accelerator.device
        self.model.train()

    def initial_loss(self, images, texts) -> float:
        net = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), self.accelerator.autocast():
            out = net(*self.to_device(images, texts))
            return float(self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                                      out.get("logit_bias"))["loss"])

    def run(self, stream: _Stream, n_steps: int) -> list[float]:
        """n_steps optimiser steps; returns the start time of each and, last, the end time (after a sync)."""
        accelerator, model, optimizer, scheduler, cfg = (self.accelerator, self.model, self.optimizer,
                                                         self.scheduler, self.cfg)
        marks = []
        for _ in range(n_steps):
            marks.append(_now())
            micro = [self.to_device(images, texts) for images, texts in stream.take(cfg.optim.accum_freq)]
            losses = self._train_step(model, micro, self.loss_fn, backward=accelerator.backward,
                                      autocast=accelerator.autocast, no_sync=lambda: accelerator.no_sync(model))
            if not torch.isfinite(losses["loss"]):
                raise RuntimeError(f"vlp: loss is {losses['loss'].item()}")
            if cfg.optim.grad_clip_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self._clamp(accelerator.unwrap_model(model))
        _sync(self.device)
        marks.append(_now())
        return marks


class _OpenClipData:
    """What `train_one_epoch` reads from `data["train"]`: `set_epoch`, `.dataloader` with
    `num_batches`/`num_samples`, iterating (images, texts)."""

    def __init__(self, stream: _Stream, n_batches: int, batch_size: int):
        self.dataloader = self
        self.stream, self.num_batches, self.num_samples = stream, n_batches, n_batches * batch_size
        self.marks: list[float] = []  # when each batch was asked for: a step starts with its first batch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for batch in self.stream.take(self.num_batches):
            self.marks.append(_now())
            yield batch


class OpenClipRunner:
    """open_clip_train's `train_one_epoch`, set up the way its main.py sets it up."""

    name = "open_clip_train"

    def __init__(self, model_name: str, state: dict, *, batch_size: int, accum_freq: int, precision: str,
                 compile_: bool, total_steps: int, device: str, seed: int, lr: float, wd: float,
                 betas: tuple, eps: float):
        import open_clip
        from open_clip_train.params import parse_args as oc_parse_args
        from open_clip_train.scheduler import cosine_lr
        from open_clip_train.train import train_one_epoch

        oc_precision = precision
        argv = ["--model", model_name, "--batch-size", str(batch_size), "--accum-freq", str(accum_freq),
                "--precision", oc_precision, "--lr", str(lr), "--wd", str(wd), "--beta1", str(betas[0]),
                "--beta2", str(betas[1]), "--eps", str(eps), "--warmup", str(max(1, total_steps // 4)),
                "--seed", str(seed), "--report-to", "", "--log-every-n-steps", "100"]
        if compile_:
            argv.append("--torchcompile")
        args = oc_parse_args(argv)
        # What init_distributed_device() sets for a single process.
        args.device, args.distributed, args.world_size, args.rank, args.local_rank = str(device), False, 1, 0, 0
        args.distill = False
        args.wandb = False
        self.args = args

        model, _, _ = open_clip.create_model_and_transforms(
            model_name, None, precision=oc_precision, device=device, output_dict=True, aug_cfg=args.aug_cfg)
        model.load_state_dict(state)
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(model.named_parameters())
        gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
        rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": args.wd}],
            lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
        self.scaler = torch.amp.GradScaler(device=torch.device(device).type) if oc_precision == "amp" else None
        self.scheduler = cosine_lr(self.optimizer, args.lr, args.warmup, total_steps)
        self.model = torch.compile(model) if compile_ else model
        self.loss = open_clip.create_loss(args)
        self._train_one_epoch = train_one_epoch
        self.device = torch.device(device)
        self.epoch = 0

    def initial_loss(self, images, texts) -> float:
        from open_clip.model import get_input_dtype
        from open_clip_train.precision import get_autocast

        autocast = get_autocast(self.args.precision, device_type=self.device.type)
        with torch.no_grad(), autocast():
            out = self.model(images.to(self.device, dtype=get_input_dtype(self.args.precision)),
                             texts.to(self.device))
            return float(self.loss(**out))

    def run(self, stream: _Stream, n_steps: int) -> list[float]:
        """n_steps optimiser steps (one `train_one_epoch` call); start time of each step, then the end."""
        loader = _OpenClipData(stream, n_steps * self.args.accum_freq, self.args.batch_size)
        t0 = _now()
        self._train_one_epoch(self.model, {"train": loader}, self.loss, self.epoch, self.optimizer, self.scaler,
                              self.scheduler, None, self.args, tb_writer=None)
        self.epoch += 1
        _sync(self.device)
        return [t0] + loader.marks[self.args.accum_freq::self.args.accum_freq] + [_now()]


def build_runners(model_name: str, *, batch_size, accum_freq, precision, compile_, total_steps, device, seed):
    from vlp.config import OptimConfig
    from vlp.models import create_model, resolve_model_name

    torch.manual_seed(seed)
    reference = create_model(model_name).model  # the shared initial weights
    state = copy.deepcopy(reference.state_dict())
    del reference
    oc_name = resolve_model_name(model_name)  # registers a JSON config with open_clip
    o = OptimConfig()
    common = dict(batch_size=batch_size, accum_freq=accum_freq, precision=precision, compile_=compile_,
                  total_steps=total_steps, device=device, seed=seed)
    vlp_runner = VlpRunner(model_name, state, **common)
    oc_runner = OpenClipRunner(oc_name, state, lr=o.lr, wd=o.wd, betas=(o.beta1, o.beta2), eps=o.eps, **common)
    return vlp_runner, oc_runner


def time_pair(runners, streams, *, steps, warmup, repeats) -> dict[str, dict[str, list[float]]]:
    """Warm up each runner, then `repeats` rounds of `steps` steps of each, alternating who goes
    first. Returns, per runner, every timed step's duration and every round's duration (s)."""
    for r in runners:
        if warmup:
            r.run(streams[r.name], warmup)
    out = {r.name: {"step_s": [], "step_cpu_s": [], "round_s": []} for r in runners}
    for i in range(repeats):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            marks = r.run(streams[r.name], steps)
            out[r.name]["step_s"].extend(b[0] - a[0] for a, b in zip(marks, marks[1:]))
            out[r.name]["step_cpu_s"].extend(b[1] - a[1] for a, b in zip(marks, marks[1:]))
            out[r.name]["round_s"].append(marks[-1][0] - marks[0][0])
    return out


def summarise(times: dict, samples_per_step: int, steps: int) -> dict:
    """samples/s from the median step time (headline on CPU: robust to a shared machine's load
    spikes), from the fastest step, and from each round's wall time (headline on CUDA, where a single
    step's host-side time says nothing without a sync)."""
    step_s, round_s = times["step_s"], times["round_s"]
    return {
        "median_step": samples_per_step / statistics.median(step_s),
        "best_step": samples_per_step / min(step_s),
        "rounds": [samples_per_step * steps / t for t in round_s],
        "median_round": statistics.median(samples_per_step * steps / t for t in round_s),
        # per CPU-second of this process (all its threads): the load-robust figure with --threads 1
        "median_step_cpu": samples_per_step / statistics.median(times["step_cpu_s"]),
    }


def paired_ratio(times: dict) -> float:
    """Median over rounds of vlp's round time against open_clip_train's in the same round: the two
    ran back to back, so a change of load between rounds cancels out."""
    return statistics.median(o / v for v, o in zip(times["vlp"]["round_s"], times["open_clip_train"]["round_s"]))


def spread(rates: list[float]) -> float:
    return max(rates) / min(rates)


def profile_pair(runners, streams, steps: int = 3, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    for r in runners:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            r.run(streams[r.name], steps)
        sort = "self_cuda_time_total" if r.device.type == "cuda" else "self_cpu_time_total"
        print(f"\n== profile: {r.name}, {steps} steps ==")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


# ----------------------------------------------------------------------------- GPU section

def peak_tflops(device, override=None):
    from vlp.train.telemetry import peak_flops

    if override:
        return override, "--peak-tflops"
    peak = peak_flops(device)
    return (peak / 1e12, "vlp.train.telemetry (table or VLP_PEAK_TFLOPS)") if peak else (None, "unknown GPU (pass --peak-tflops)")


def gpu_section(a, model_name: str, batch_size: int, device: str = "cuda") -> dict:
    import open_clip

    from vlp.train.telemetry import flops_per_sample

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = open_clip.get_model_config(model_name)
    image_size = cfg["vision_cfg"]["image_size"]
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    ctx, vocab = cfg["text_cfg"].get("context_length", 77), cfg["text_cfg"].get("vocab_size", 49408)
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    batches = []
    for _ in range(2):
        images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        texts = torch.randint(1, vocab - 1, (batch_size, ctx), generator=g)
        texts[:, -1] = vocab - 1  # an end-of-text token where argmax pooling finds it
        batches.append((images.to(device), texts.to(device)))
    total = a.gpu_warmup + a.gpu_steps * a.gpu_repeats + 8
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    runners = build_runners(model_name, batch_size=batch_size, accum_freq=1, precision="amp_bf16",
                            compile_=a.compile, total_steps=total, device=str(device), seed=a.seed)
    net = runners[0].accelerator.unwrap_model(runners[0].model, keep_torch_compile=False)
    fps = 3 * flops_per_sample(net)  # training ~ 3x forward
    streams = {r.name: _Stream(batches) for r in runners}
    times = time_pair(runners, streams, steps=a.gpu_steps, warmup=a.gpu_warmup, repeats=a.gpu_repeats)
    peak, source = peak_tflops(device, a.peak_tflops)
    res = {"device": name, "model": model_name, "batch_size": batch_size, "precision": "bf16 (autocast)",
           "compile": a.compile, "flops_per_sample": fps, "peak_tflops": peak, "peak_source": source,
           "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "samples_per_s": {}, "mfu": {}}
    for r in runners:
        summary = summarise(times[r.name], batch_size, a.gpu_steps)
        res.setdefault("summary", {})[r.name] = summary
        med = summary["median_round"]
        res["samples_per_s"][r.name] = med
        res["mfu"][r.name] = med * fps / (peak * 1e12) if peak else None
    res["ratio"] = res["samples_per_s"]["vlp"] / res["samples_per_s"]["open_clip_train"]
    res["paired_ratio"] = paired_ratio(times)
    if a.profile:
        profile_pair(runners, streams)
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


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

    if torch.cuda.is_available() and not a.no_gpu:
        models, sizes = _list(a.gpu_model), [int(x) for x in _list(a.gpu_batch_size)]
        sizes = sizes * len(models) if len(sizes) == 1 else sizes
        if len(sizes) != len(models):
            raise SystemExit("error: --gpu-batch-size: give one size, or one per --gpu-model")
        result["gpu"] = [gpu_section(a, m, b) for m, b in zip(models, sizes)]
    for g in result.get("gpu", []):
        print(f"\n== GPU: {g['model']} bf16, batch {g['batch_size']}, on {g['device']} ==")
        print(f"FLOPs per sample (3 x forward, vlp.train.telemetry): {g['flops_per_sample'] / 1e9:.1f} GFLOP; "
              f"peak {g['peak_tflops']} TFLOP/s bf16 dense ({g['peak_source']}); "
              f"max memory {g['max_memory_gib'] or 0:.1f} GiB")
        for k in ("vlp", "open_clip_train"):
            mfu = g["mfu"][k]
            print(f"{k}: {g['samples_per_s'][k]:.1f} samples/s, MFU "
                  f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
        print(f"(median over {a.gpu_repeats} rounds of {a.gpu_steps} steps, synchronised at each round's end)")
        print(f"ratio vlp/open_clip_train: {g['ratio']:.3f} (paired: {g['paired_ratio']:.3f})")
    result["wall_s"] = time.perf_counter() - t_start
    print(f"\n(total {result['wall_s']:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
