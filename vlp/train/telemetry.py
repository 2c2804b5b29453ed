"""Live throughput telemetry: how fast the run goes, how much of it waits for data, how close to the
device's peak it computes (MFU).

`tower_flops`/`flops_per_sample` count a model's forward FLOPs once (torch.utils.flop_counter over a forward on
meta tensors: shapes only, no compute, no memory, the same figure on any device); `Meter` times the
loop's steps and turns them into `perf/*` scalars for metrics.jsonl, TensorBoard and the progress bar.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Optional

import torch

from vlp import compat

__all__ = ["PEAK_BF16_TFLOPS", "Meter", "flops_per_sample", "peak_flops", "peak_tflops_of", "tower_flops",
           "train_flops_per_sample"]

# Peak dense bf16 tensor-core throughput, TFLOP/s (without 2:4 sparsity), from NVIDIA's data sheets:
# H100 SXM5 989.4 and H100 PCIe 756 (the sheet's 1979/1513 are with sparsity), H100 NVL 835, H200 and
# GH200 989.4 (same compute as H100 SXM), A100 312, L40S 362, L40 181, A10G 70 (approx.), L4 121.
# A key matches whole words of torch.cuda.get_device_name() ("NVIDIA L40" is an L40, not an L4); the first
# key that matches wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),
    ("L4", 121.0),
]
PEAK_ENV = "VLP_PEAK_TFLOPS"  # a GPU the table does not know: its peak dense bf16 TFLOP/s


def _words(name: str) -> list[str]:
    return re.split(r"[\s\-_/]+", name.strip().lower())


def peak_tflops_of(gpu_name: str) -> Optional[float]:
    """The table's peak for a GPU name as torch reports it, matched on whole words; None if unknown."""
    words = _words(gpu_name)
    for key, tflops in PEAK_BF16_TFLOPS:
        k = _words(key)
        if any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            return tflops
    return None


def peak_flops(device) -> Optional[float]:
    """The device's peak dense bf16 FLOP/s, or None (CPU, unknown GPU): then MFU is not reported.
    `VLP_PEAK_TFLOPS` overrides the table."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tflops = peak_tflops_of(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def _input_shapes(model: torch.nn.Module, image_size, context_length) -> tuple[tuple, int]:
    if image_size is None:
        image_size = getattr(getattr(model, "visual", None), "image_size", None)
        if image_size is None:
            import open_clip

            image_size = open_clip.get_model_preprocess_cfg(model)["size"]
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if context_length is None:
        context_length = model.context_length
    return tuple(image_size), int(context_length)


def tower_flops(model: torch.nn.Module, image_size=None, context_length: Optional[int] = None) -> dict:
    """Forward FLOPs of one (image, text) pair through `model(images, texts)`, per tower: {"image", "text"}
    (the text side is everything outside `model.visual`, its projection included). A multiply-add counts 2;
    matmuls, convolutions and attention; elementwise ops not counted.

    Counted on meta tensors standing in for the parameters (`torch.func.functional_call`): nothing is
    computed or allocated, the model is left as it was, and attention is counted the same way on every
    device (CPU kernels of fused attention are invisible to the counter). The model's train/eval mode
    is used as is (patch dropout, for one, changes the count). Sizes default to the model's own."""
    if hasattr(model, "_vlp_tower_flops"):  # a sharded model: counted before sharding (its hooks would gather)
        if model._vlp_tower_flops is None:
            raise ValueError("FLOPs of this model could not be counted")
        return dict(model._vlp_tower_flops)
    FlopCounterMode = compat.require_flop_counter("counting FLOPs per sample")
    (h, w), ctx = _input_shapes(model, image_size, context_length)
    # plain meta tensors of each weight's full shape (also for sharded DTensor weights under FSDP)
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
            for name, t in [*model.named_parameters(), *model.named_buffers()]}
    images = torch.zeros(1, 3, h, w, device="meta")
    texts = torch.zeros(1, ctx, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    # forked RNG: a train-mode forward draws CPU random numbers (open_clip's patch dropout), which would shift a
    # resumed run's dropout masks (tests/test_train_resume_dropout.py)
    with counter, torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.func.functional_call(model, meta, (images, texts), tie_weights=True, strict=False)
    total = int(counter.get_total_flops())
    image = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                if name.count(".") == 1 and name.endswith(".visual"))
    return {"image": int(image), "text": total - int(image)}


def flops_per_sample(model: torch.nn.Module, image_size=None, context_length: Optional[int] = None) -> int:
    """Forward FLOPs of one (image, text) pair (both towers, `tower_flops`). Training costs about 3x this."""
    return sum(tower_flops(model, image_size, context_length).values())


def _tower_trains(model: torch.nn.Module) -> dict:
    """Whether any parameter of each tower takes a gradient (--lock-image / --lock-text freeze one)."""
    trains = {"image": False, "text": False}
    for name, p in model.named_parameters():
        if name in ("logit_scale", "logit_bias"):
            continue
        tower = "image" if name.startswith("visual.") else "text"
        trains[tower] = trains[tower] or p.requires_grad
    return trains


def train_flops_per_sample(model: torch.nn.Module) -> int:
    """FLOPs of one training sample: forward (1x) plus backward (2x: input and weight gradients) for the towers
    that train; a frozen tower (--lock-image, --lock-text) runs its forward only. A partly unlocked tower
    counts as trained (its backward stops at the lowest unlocked layer: an upper bound)."""
    flops, trains = tower_flops(model), _tower_trains(model)
    return sum(f * (3 if trains[tower] else 1) for tower, f in flops.items())


def _cuda_event():
    return torch.cuda.Event(enable_timing=True)


class Meter:
    """Times the loop's steps and reports `perf/*` over the steps since the last report.

    A step's time runs from when the loop starts waiting for its batches (`waiting()`) to when the
    optimiser step is done (`step()`); time in between steps (logging, checkpoints, evaluation) is left
    out, so the figures describe training itself. The loop syncs with the device every step (its
    finite-loss check), so host wall time is the device's time too.

    Data wait: `perf/host_data_wait_frac` is the host's time inside `waiting()`. On CUDA the host fetches
    while the GPU still runs the step it was given, so the host figure is not the GPU's idle time;
    `perf/data_wait_frac` is the GPU's: an event recorded when the wait starts (after the step's kernels
    were enqueued) and one when it ends (the batches' copies enqueued), timed on the GPU, measure how long
    the GPU had nothing to run but the batches' copies. Without device events (CPU) both are the host's."""

    def __init__(self, samples_per_step: int, world_size: int = 1, flops: Optional[int] = None, device="cpu",
                 clock=time.perf_counter, events: Optional[Callable] = None):
        """`flops`: training FLOPs per sample (`train_flops_per_sample`). `events`: makes device timing events
        (`record()`, `elapsed_time(other)` in ms, `synchronize()`); CUDA's by default on a CUDA device."""
        self.samples_per_step, self.world_size, self.clock = samples_per_step, world_size, clock
        self.flops, self.device = flops, torch.device(device)
        self.peak = peak_flops(self.device)
        self.events = events if events is not None else (_cuda_event if self.device.type == "cuda" else None)
        self._reset()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @classmethod
    def for_model(cls, model: torch.nn.Module, samples_per_step: int, world_size: int, device) -> "Meter":
        """A Meter for training `model`; its FLOPs are counted only where MFU can be reported (known peak)."""
        flops = None
        if peak_flops(device) and compat.has_flop_counter():
            try:
                flops = train_flops_per_sample(model)
            except Exception as e:  # an architecture the counter cannot trace: no MFU, training goes on
                warnings.warn(f"FLOPs per sample not counted ({type(e).__name__}: {e}); perf/mfu left out")
        return cls(samples_per_step, world_size, flops, device)

    def _reset(self) -> None:
        self.steps, self.busy_s, self.wait_s = 0, 0.0, 0.0
        self._start: Optional[float] = None
        self._waits: list = []   # (start, end) device events of each wait since the last report

    def begin(self) -> None:
        """A step's work starts (its clock, unless a wait for its batches already started it)."""
        if self._start is None:
            self._start = self.clock()

    @contextmanager
    def waiting(self):
        """Around fetching (and moving) batches: starts the step's clock if not running, counts data wait.
        An epoch's end (no batch) and the next epoch's first wait are one step's."""
        t0 = self.clock()
        self.begin()
        if self.events is not None:
            start = self.events()
            start.record()
        try:
            yield
        finally:
            self.wait_s += self.clock() - t0
            if self.events is not None:
                end = self.events()
                end.record()
                self._waits.append((start, end))

    def step(self) -> None:
        """The optimiser step is done."""
        if self._start is not None:
            self.busy_s += self.clock() - self._start
            self._start = None
            self.steps += 1

    def _device_wait_s(self) -> float:
        if self._waits:
            self._waits[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._waits) / 1e3

    def report(self) -> dict:
        """`perf/*` scalars over the steps since the last report (empty if none), then start afresh."""
        if not self.steps or self.busy_s <= 0:
            return {}
        per_device = self.samples_per_step * self.steps / self.busy_s / self.world_size
        host_wait = min(1.0, self.wait_s / self.busy_s)
        out = {
            "perf/samples_per_s": per_device * self.world_size,
            "perf/samples_per_s_per_device": per_device,
            "perf/data_wait_frac": host_wait if self.events is None else min(1.0, self._device_wait_s() / self.busy_s),
            "perf/host_data_wait_frac": host_wait,
            "perf/step_ms": 1e3 * self.busy_s / self.steps,
        }
        if self.flops and self.peak:
            out["perf/mfu"] = self.flops * per_device / self.peak
        if self.device.type == "cuda":
            out["perf/max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self._reset()
        return out
