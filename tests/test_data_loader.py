"""Round trip CSV -> make_shards -> loader; epoch coverage across ranks x workers; exact resume."""
from __future__ import annotations

import json

import pytest
import torch

from data_tools import make_shards
from tests.test_data_fixtures import IdTokenizer, cfg, collect, jpeg, preprocess, resumed, write_shards
from vlp.data.errors import DataError
from vlp.data.pipeline import build_train_loader


def _csv_dataset(tmp_path, n):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    lines = ["filepath,caption,extra"]
    for i in range(n):
        (img_dir / f"im{i}.jpg").write_bytes(jpeg(i, (60, 45)))
        lines.append(f"imgs/im{i}.jpg,cap {i} words,x{i}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.csv"


def _ids(batches):
    return [int(i) for _, t in batches for i in t[:, 0]]


def test_round_trip_every_sample_once_per_epoch(tmp_path):
    n = 96
    csv = _csv_dataset(tmp_path, n)
    assert make_shards.main(["--input", str(csv), "--output", str(tmp_path / "sh"), "--per-shard", "10",
                             "--no-progress"]) == 0
    sizes = json.loads((tmp_path / "sh" / "sizes.json").read_text())
    assert sum(sizes.values()) == n and len(sizes) == 10
    c = cfg(str(tmp_path / "sh" / "{00000..00009}.tar"), batch_size=8, workers=2)
    pre, tok = preprocess(16), IdTokenizer()
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            L = build_train_loader(c, pre, tok, rank=rank, world_size=2, seed=3)
            assert L.batches_per_epoch == 6 and L.samples_per_epoch == 96
            L.set_epoch(epoch)
            batches = collect(L)
            assert len(batches) == 6
            for x, t in batches:
                assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
                assert t.dtype == torch.long
            seen += _ids(batches)
            assert L.skip_counts() == {}
        assert sorted(seen) == list(range(n)), "each sample exactly once per epoch"
        orders.append(seen)
    assert orders[0] != orders[1], "epochs are shuffled differently"


def test_uneven_data_no_duplicates(tmp_path):
    paths = write_shards(tmp_path / "sh", 75, 7)
    c = cfg(str(tmp_path / "sh" / "{00000..00010}.tar"), batch_size=4, workers=3)
    seen = []
    for rank in (0, 1):
        L = build_train_loader(c, preprocess(), IdTokenizer(), rank=rank, world_size=2)
        b = collect(L)
        assert len(b) == L.batches_per_epoch == 75 // 8
        seen += _ids(b)
    assert len(seen) == len(set(seen)) and 75 - len(seen) < 8


def test_resume_continues_with_next_unseen_batch(tmp_path):
    bad = {5: {"jpg": b"not an image"}, 30: {"txt": b""}}
    write_shards(tmp_path / "sh", 60, 9, rewrites=2, bad=bad)
    c = cfg(str(tmp_path / "sh" / "{00000..00006}.tar"), batch_size=4, workers=2, use_rewrites=True)
    pre, tok = preprocess(), IdTokenizer()
    full = build_train_loader(c, pre, tok, seed=7)
    full.set_epoch(1)
    ref = collect(full)
    for k in (3, 8):
        R = resumed(c, k, seed=7, epoch=1)
        rest = collect(R)
        assert len(rest) == len(ref) - k
        for (xa, ta), (xb, tb) in zip(rest, ref[k:]):
            assert torch.equal(ta, tb) and torch.equal(xa, xb)
        assert R.skip_counts() == full.skip_counts() == {"empty_caption": 1, "not_image": 1}


def test_resume_resampled(tmp_path):
    write_shards(tmp_path / "sh", 40, 10)
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=2, dataset_resampled=True,
            train_num_samples=48)
    ref = collect(build_train_loader(c, preprocess(), IdTokenizer(), seed=1))
    assert len(ref) == 12
    rest = collect(resumed(c, 5, seed=1))
    assert [torch.equal(a[1], b[1]) for a, b in zip(rest, ref[5:])] == [True] * 7


def test_resume_refuses_other_worker_count(tmp_path):
    write_shards(tmp_path / "sh", 40, 10)
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), workers=2)
    st = build_train_loader(c, preprocess(), IdTokenizer()).state_dict()
    c2 = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), workers=1)
    with pytest.raises(DataError, match="workers"):
        build_train_loader(c2, preprocess(), IdTokenizer()).load_state_dict(st)


def test_upsampling_factors_in_epoch_mode(tmp_path):
    write_shards(tmp_path / "a", 20, 5)
    write_shards(tmp_path / "b", 20, 5, start=100)
    spec = f"{tmp_path}/a/{{00000..00003}}.tar::{tmp_path}/b/{{00000..00003}}.tar"
    c = cfg(spec, batch_size=5, workers=0, train_data_upsampling_factors="2::0.5", shuffle_buffer=0)
    ids = _ids(collect(build_train_loader(c, preprocess(), IdTokenizer())))
    a = [i for i in ids if i < 100]
    b = [i for i in ids if i >= 100]
    assert sorted(set(a)) == list(range(20)) and len(a) == 40  # each of source a twice
    assert len(b) == 10 and len(set(b)) == 10  # half of source b's shards, once


def test_too_little_data_is_one_line_error(tmp_path):
    write_shards(tmp_path / "sh", 5, 5)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_loader(cfg(str(tmp_path / "sh" / "00000.tar"), batch_size=8), preprocess(), IdTokenizer())
    with pytest.raises(DataError, match="no shard"):
        build_train_loader(cfg(str(tmp_path / "nope" / "{0..3}.tar")), preprocess(), IdTokenizer())


def test_device_normalize_hands_over_uint8_that_normalises_to_the_host_floats(tmp_path):
    from vlp.data.transforms import normalize_uint8

    write_shards(tmp_path / "sh", 40, 10)
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=2)
    host = collect(build_train_loader(c, preprocess(), IdTokenizer(), seed=5))
    L = build_train_loader(c, preprocess(), IdTokenizer(), seed=5, device_normalize=True)
    mean, std = L.normalization
    assert len(mean) == len(std) == 3 and 0.4 < mean[0] < 0.5
    dev = collect(L)
    assert len(dev) == len(host) == 10
    for (xu, tu), (xf, tf) in zip(dev, host):
        assert xu.dtype == torch.uint8 and xu.shape == (4, 3, 16, 16)
        assert xu.is_pinned() == torch.cuda.is_available()
        assert torch.equal(tu, tf) and torch.equal(normalize_uint8(xu, mean, std), xf)


def test_iterating_leaves_torch_global_rng_alone(tmp_path):
    """A DataLoader iterator draws its base seed from torch's global RNG unless given a generator; then a resumed
    run's dropout masks differ from the uninterrupted run's (issue #12: 8 of 24 steps identical)."""
    write_shards(tmp_path / "sh", 40, 10)
    for workers in (0, 2):
        L = build_train_loader(cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=workers),
                               preprocess(), IdTokenizer())
        torch.manual_seed(123)
        before = torch.get_rng_state()
        it = iter(L)
        next(it)
        it.close()
        assert torch.equal(torch.get_rng_state(), before)
