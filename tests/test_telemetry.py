"""perf/* telemetry: the FLOP count against open_clip's published profile and a hand count, the
device peak table, and the Meter's arithmetic on a scripted clock."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch

import vlp.models  # noqa: F401  (registers vlp's model configs)
from tests.conftest import MICRO_CFG
from vlp.train import telemetry
from vlp.train.telemetry import Meter, flops_per_sample, peak_flops, peak_tflops_of


def test_vit_b32_forward_flops_match_open_clip_profile():
    # shared/reference.md: open_clip docs/model_profile.csv gives ViT-B-32 14.78 GFLOP forward at 224 px.
    model = open_clip.create_model("ViT-B-32", device="meta").eval()
    assert flops_per_sample(model) / 1e9 == pytest.approx(14.78, abs=0.005)


def _tower(tokens: int, width: int, mlp: int, layers: int) -> int:
    """Hand count of one pre-norm transformer: qkv, attention scores and mix, out proj, MLP (2 per MAC)."""
    per_layer = 2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width \
        + 2 * 2 * tokens * width * mlp
    return layers * per_layer


def test_hand_count_and_model_untouched(tmp_path):
    v, t, d = MICRO_CFG["vision_cfg"], MICRO_CFG["text_cfg"], MICRO_CFG["embed_dim"]
    path = tmp_path / "vlp-micro-flops.json"
    path.write_text(json.dumps(MICRO_CFG))
    open_clip.add_model_config(path)
    model = open_clip.create_model("vlp-micro-flops").eval()
    patches = (v["image_size"] // v["patch_size"]) ** 2
    vision = 2 * patches * 3 * v["patch_size"] ** 2 * v["width"] \
        + _tower(patches + 1, v["width"], int(v["width"] * v["mlp_ratio"]), v["layers"]) + 2 * v["width"] * d
    text = _tower(t["context_length"], t["width"], int(t["width"] * t["mlp_ratio"]), t["layers"]) + 2 * t["width"] * d
    before = {k: p.clone() for k, p in model.state_dict().items()}
    assert flops_per_sample(model) == vision + text
    assert telemetry.tower_flops(model) == {"image": vision, "text": text}
    # meta stand-ins only: the real weights are where and what they were
    assert all(p.device.type == "cpu" and torch.equal(p, before[k]) for k, p in model.state_dict().items())
    # training: forward + backward (2x) for the towers that train; a locked tower runs its forward only
    assert telemetry.train_flops_per_sample(model) == 3 * (vision + text)
    model.lock_image_tower()
    assert telemetry.train_flops_per_sample(model) == vision + 3 * text
    model = open_clip.create_model("vlp-micro-flops").eval()
    model.lock_text_tower()
    assert telemetry.train_flops_per_sample(model) == 3 * vision + text


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce GTX 1080", None),
    ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A10G", 70.0),
    ("NVIDIA A10", None), ("NVIDIA A100 80GB PCIe", 312.0),
])
def test_peak_table(monkeypatch, name, tflops):
    monkeypatch.delenv(telemetry.PEAK_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got = peak_flops("cuda:0")
    assert got == (None if tflops is None else tflops * 1e12)
    assert peak_tflops_of(name) == tflops  # whole words: an L40 is not an L4, an A10 not an A10G or A100


def test_locked_tower_mfu_ratio_for_vit_b16():
    # issue 23.6: counting 3x forward for a frozen image tower overstated ViT-B/16's MFU 2.33x
    model = open_clip.create_model("ViT-B-16", device="meta")
    model.lock_image_tower()
    flops = telemetry.tower_flops(model)
    assert sum(flops.values()) / 1e9 == pytest.approx(41.09, abs=0.01)
    assert 3 * sum(flops.values()) / telemetry.train_flops_per_sample(model) == pytest.approx(2.33, abs=0.01)


def test_cpu_has_no_peak_unless_given(monkeypatch):
    monkeypatch.delenv(telemetry.PEAK_ENV, raising=False)
    assert peak_flops("cpu") is None
    monkeypatch.setenv(telemetry.PEAK_ENV, "2.5")
    assert peak_flops("cpu") == 2.5e12


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_meter_figures_on_a_scripted_clock(monkeypatch):
    monkeypatch.delenv(telemetry.PEAK_ENV, raising=False)
    clock = Clock()
    meter = Meter(samples_per_step=64, world_size=2, flops=10**9, device="cpu", clock=clock)
    assert meter.report() == {}
    for wait, compute in [(0.1, 0.3), (0.0, 0.4), (0.2, 0.2)]:
        with meter.waiting():
            clock.t += wait
        clock.t += compute
        meter.step()
        clock.t += 5.0  # logging/eval/checkpoint between steps: not counted
    out = meter.report()
    assert out["perf/step_ms"] == pytest.approx(400.0)
    assert out["perf/data_wait_frac"] == pytest.approx(0.3 / 1.2)
    assert out["perf/samples_per_s"] == pytest.approx(64 * 3 / 1.2)
    assert out["perf/samples_per_s_per_device"] == pytest.approx(32 * 3 / 1.2)
    assert "perf/mfu" not in out and "perf/max_mem_gb" not in out  # CPU, no known peak
    assert meter.report() == {}  # a report starts a new window

    # the training loop's order: compute, then the next step's fetch inside the step (vlp.train.feed)
    meter = Meter(samples_per_step=64, world_size=1, flops=None, device="cpu", clock=clock)
    for _ in range(2):
        meter.begin()
        clock.t += 0.3            # forward and backward
        with meter.waiting():
            clock.t += 0.1        # the next step's batches
        meter.step()
        clock.t += 5.0
    out = meter.report()
    assert out["perf/step_ms"] == pytest.approx(400.0) and out["perf/data_wait_frac"] == pytest.approx(0.25)
    assert out["perf/host_data_wait_frac"] == out["perf/data_wait_frac"]  # no device events: the host is the device

    # an epoch that ends (a wait without a step) and the next epoch's first batch: one step's time
    monkeypatch.setenv(telemetry.PEAK_ENV, "1")  # 1 TFLOP/s
    meter = Meter(samples_per_step=10, world_size=1, flops=10**9, device="cpu", clock=clock)
    with meter.waiting():
        clock.t += 0.5
    with meter.waiting():
        clock.t += 0.5
    clock.t += 1.0
    meter.step()
    out = meter.report()
    assert out["perf/step_ms"] == pytest.approx(2000.0)
    assert out["perf/data_wait_frac"] == pytest.approx(0.5)
    assert out["perf/mfu"] == pytest.approx(1e9 * 5.0 / 1e12)  # `flops` counts the whole training sample


class FakeGPU:
    """A device stream on the scripted host clock: work enqueued runs after the work before it, an event
    completes when the stream reaches it (torch.cuda.Event's record/elapsed_time/synchronize)."""

    def __init__(self, clock):
        self.clock, self.free_at = clock, clock.t

    def enqueue(self, seconds: float) -> None:
        self.free_at = max(self.free_at, self.clock.t) + seconds

    def sync(self) -> None:
        self.clock.t = max(self.clock.t, self.free_at)

    def event(self):
        gpu = self

        class Event:
            def record(self):
                self.t = gpu.free_at = max(gpu.free_at, gpu.clock.t)

            def synchronize(self):
                gpu.clock.t = max(gpu.clock.t, self.t)

            def elapsed_time(self, end):
                return 1e3 * (end.t - self.t)

        return Event()


@pytest.mark.parametrize("fetch_s, gpu_idle_frac", [(0.08, 0.0), (0.3, 0.1 / 0.3)])
def test_device_data_wait_is_gpu_idle_time(monkeypatch, fetch_s, gpu_idle_frac):
    # issue 23.5: a 200 ms GPU step with an 80 ms host fetch meanwhile reported 0.40 where the GPU idled 0
    monkeypatch.delenv(telemetry.PEAK_ENV, raising=False)
    clock = Clock()
    gpu = FakeGPU(clock)
    meter = Meter(samples_per_step=8, device="cpu", clock=clock, events=gpu.event)
    for _ in range(3):
        meter.begin()
        gpu.enqueue(0.2)          # forward, backward: enqueued, the host returns at once
        with meter.waiting():
            clock.t += fetch_s    # the next step's batches, on the host
        gpu.sync()                # the end-of-step check waits for the device
        meter.step()
    out = meter.report()
    step_s = max(0.2, fetch_s)
    assert out["perf/step_ms"] == pytest.approx(1e3 * step_s)
    assert out["perf/host_data_wait_frac"] == pytest.approx(fetch_s / step_s)
    assert out["perf/data_wait_frac"] == pytest.approx(gpu_idle_frac, abs=1e-9)
