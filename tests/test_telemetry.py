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
from vlp.train.telemetry import Meter, flops_per_sample, peak_flops


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
    # meta stand-ins only: the real weights are where and what they were
    assert all(p.device.type == "cpu" and torch.equal(p, before[k]) for k, p in model.state_dict().items())


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_table(monkeypatch, name, tflops):
    monkeypatch.delenv(telemetry.PEAK_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got = peak_flops("cuda:0")
    assert got == (None if tflops is None else tflops * 1e12)


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
    assert out["perf/mfu"] == pytest.approx(3 * 1e9 * 5.0 / 1e12)
