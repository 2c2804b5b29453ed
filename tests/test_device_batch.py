"""The device-side data path (uint8 images normalised on the training device), run on CPU: it equals the
host path batch for batch, and a training run on it never sees float images from the loader, logs the
same losses as the host path, and logs perf/* telemetry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_data_fixtures import IdTokenizer, cfg, collect, preprocess, write_shards
from tests.test_train_loop import _flags, _losses
from vlp.config import parse_config
from vlp.data.pipeline import build_train_loader
from vlp.train import device_batch, telemetry
from vlp.train.device_batch import DeviceBatch


def _pair_of_loaders(tmp_path):
    write_shards(tmp_path / "sh", 40, 10)
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=2)
    host = collect(build_train_loader(c, preprocess(), IdTokenizer(), seed=5))
    loader = build_train_loader(c, preprocess(), IdTokenizer(), seed=5, device_normalize=True)
    return host, collect(loader), loader.normalization


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_path_equals_host_path(tmp_path, device):
    host, raw, norm = _pair_of_loaders(tmp_path)
    assert len(raw) == len(host) == 10
    fp32, bf16 = DeviceBatch(device, norm, torch.float32), DeviceBatch(device, norm, torch.bfloat16)
    host = [(x.to(device), t.to(device)) for x, t in host]
    for (xu, tu), (xf, tf) in zip(raw, host):
        assert xu.dtype == torch.uint8 and xu.is_pinned() == torch.cuda.is_available()
        x32, t32 = fp32(xu, tu)
        assert x32.dtype == torch.float32 and torch.equal(t32, tf)
        assert torch.equal(x32, xf)  # the loader's own arithmetic: bit for bit
        x16, _ = bf16(xu, tu)
        assert x16.dtype == torch.bfloat16  # the run's compute dtype, stored once
        assert torch.equal(x16, xf.to(torch.bfloat16))  # rounded once, from the same floats
    # float images (the host path) pass through untouched
    xf, tf = host[0]
    assert fp32(xf, tf)[0] is xf


def test_uint8_without_normalization_is_refused():
    with pytest.raises(ValueError, match="normalization"):
        DeviceBatch("cpu")(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.long))


def test_only_cuda_wants_the_device_path():
    assert device_batch.wanted("cuda:0") and device_batch.wanted(torch.device("cuda"))
    assert not device_batch.wanted("cpu")


def _perf_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/samples_per_s" in r]


def test_training_on_the_device_path_matches_host_path_and_logs_perf(demo_data, micro_model_json, tmp_path,
                                                                     monkeypatch):
    from vlp.train.loop import train

    steps = ["--max-steps", "6", "--log-every", "3"]
    monkeypatch.delenv(telemetry.PEAK_ENV, raising=False)
    host = train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "host", *steps)))
    rows = _perf_rows(Path(host["run_dir"]))
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert r["perf/samples_per_s"] == pytest.approx(r["perf/samples_per_s_per_device"])  # one process
        assert r["perf/samples_per_s"] == pytest.approx(32 * 1000 / r["perf/step_ms"], rel=1e-6)
        assert 0 <= r["perf/data_wait_frac"] <= 1
        assert "perf/mfu" not in r and "perf/max_mem_gb" not in r  # CPU: no known peak, no CUDA memory

    seen = []
    moved = DeviceBatch.__call__

    def spy(self, images, texts):
        seen.append(images.dtype)
        return moved(self, images, texts)

    monkeypatch.setattr(device_batch, "wanted", lambda device: True)  # the CUDA path, on CPU
    monkeypatch.setattr(DeviceBatch, "__call__", spy)
    monkeypatch.setenv(telemetry.PEAK_ENV, "1")  # a 1 TFLOP/s "device": MFU is reported
    dev = train(parse_config(_flags(demo_data, micro_model_json, tmp_path, "device", *steps)))
    assert seen and set(seen) == {torch.uint8}  # the loader never handed over float images
    ref, got = _losses(Path(host["run_dir"])), _losses(Path(dev["run_dir"]))
    assert sorted(got) == [3, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], abs=1e-5)
    from vlp.models import create_model

    flops = telemetry.flops_per_sample(create_model(micro_model_json).model)
    for r in _perf_rows(Path(dev["run_dir"])):
        assert r["perf/mfu"] == pytest.approx(3 * flops * r["perf/samples_per_s_per_device"] / 1e12)


class _Streams:
    """CUDA's stream API on CPU (the `CudaStreams` methods): records which stream is current, which events are
    recorded where and waited for by whom, and which tensors are recorded on which stream."""

    def __init__(self):
        self.log, self.compute, self.current = [], "compute", "compute"

    def Stream(self, device):
        return "side"

    def Event(self):
        streams = self

        class Event:
            def record(self, stream):
                streams.log.append(("event", stream, self))
        return Event()

    def stream(self, s):
        from contextlib import contextmanager

        @contextmanager
        def on():
            before, self.current = self.current, s
            try:
                yield
            finally:
                self.current = before
        return on()

    def current_stream(self, device):
        streams = self

        class Current:
            def wait_event(self, event):
                streams.log.append(("wait", streams.current, event))
        return Current()

    def record(self, tensor, stream):
        self.log.append(("record_stream", "compute", tensor))


def test_copies_run_on_a_side_stream_and_are_handed_over(tmp_path):
    """The next step's copy and normalisation are enqueued on the side stream; the compute stream waits for each
    batch's event when the step becomes current, and every tensor is recorded as used by the compute stream."""
    from torch.overrides import TorchFunctionMode

    from vlp.train.device_batch import CopyStream
    from vlp.train.feed import StepFeed

    _, raw, norm = _pair_of_loaders(tmp_path)
    streams = _Streams()

    class Ops(TorchFunctionMode):   # on which stream each tensor op of the copy was enqueued
        def __torch_function__(self, func, types, args=(), kwargs=None):
            streams.log.append(("op", streams.current, getattr(func, "__name__", "")))
            return func(*args, **(kwargs or {}))

    side = DeviceBatch("cpu", norm, torch.bfloat16, copy_stream=CopyStream("cpu", streams=streams))

    class Loader:   # two micro-batches per step from the uint8 batches
        def __iter__(self):
            return iter(raw)

        def state_dict(self):
            return {}
    feed = StepFeed(Loader(), 2, side)
    feed.start()
    with Ops():
        assert feed.fetch()
    ops = [e for e in streams.log if e[0] == "op"]
    assert ops and all(stream == "side" for _, stream, _ in ops)                  # nothing on the compute stream
    events = [e[2] for e in streams.log if e[0] == "event"]
    assert len(events) == 2 and all(e[1] == "side" for e in streams.log if e[0] == "event")
    assert not [e for e in streams.log if e[0] in ("wait", "record_stream")]      # not handed over before needed
    streams.log.clear()
    feed.advance()
    assert [e[2] for e in streams.log if e[0] == "wait"] == events                # compute waits for each copy
    assert all(e[1] == "compute" for e in streams.log if e[0] == "wait")
    recorded = [e[2] for e in streams.log if e[0] == "record_stream"]
    assert len(recorded) == 4 and all(any(r is t for r in recorded) for batch in feed.current for t in batch)
    plain = DeviceBatch("cpu", norm, torch.bfloat16)
    for (x, t), (xu, tu) in zip(feed.current, raw):                               # the same batches as without
        px, pt = plain(xu, tu)
        assert torch.equal(x, px) and torch.equal(t, pt)
