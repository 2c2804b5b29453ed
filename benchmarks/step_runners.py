"""The two training-step contenders the step benchmarks time (benchmarks/train_step.py on CPU, benchmarks/gpu.py's
compute-only ceiling, benchmarks/compile.py): vlp's Trainer step (the one `vlp.train.loop.train` drives), and
open_clip_train's `train_one_epoch` set up as its main.py sets it up, fed the same in-memory batches."""
from __future__ import annotations

import copy
import itertools
import statistics
import time

import torch


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
    """vlp's optimiser step: `vlp.train.trainer.Trainer.step`, the object `vlp.train.loop.train` drives (its
    gradient-norm check and per-step agreement included), fed without the loader or logging."""

    name = "vlp"

    def __init__(self, model_name: str, state: dict, *, batch_size: int, accum_freq: int, precision: str,
                 compile_: bool, total_steps: int, device: str, seed: int):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        from vlp import precision as prec
        from vlp.config import Config, validate
        from vlp.losses import prepare_model_for_loss
        from vlp.models import create_model
        from vlp.train.device_batch import DeviceBatch
        from vlp.train.trainer import Trainer

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
        model = create_model(model_name).model
        model.load_state_dict(state)
        prepare_model_for_loss(model, cfg.loss)
        self.trainer = Trainer(cfg, accelerator, model, total_steps=total_steps, steps_per_epoch=total_steps,
                               precision=precision)
        self.accelerator, self.model = accelerator, self.trainer.model
        self.to_device = DeviceBatch(accelerator.device, None, prec.compute_dtype(precision), prec.input_dtype(precision))
        self.device = accelerator.device

    def initial_loss(self, images, texts) -> float:
        net, loss_fn = self.trainer.net, self.trainer.loss_fn
        with torch.no_grad(), self.accelerator.autocast():
            out = net(*self.to_device(images, texts))
            return float(loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                                 out.get("logit_bias"))["loss"])

    def run(self, stream: _Stream, n_steps: int) -> list[float]:
        """n_steps optimiser steps; returns the start time of each and, last, the end time (after a sync)."""
        marks = []
        for _ in range(n_steps):
            marks.append(_now())
            micro = [self.to_device(images, texts) for images, texts in stream.take(self.cfg.optim.accum_freq)]
            _, verdict = self.trainer.step(micro)
            if verdict.problem:
                raise RuntimeError(f"vlp: {verdict.problem}")
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
