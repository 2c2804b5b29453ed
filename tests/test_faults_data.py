"""Fault injection on the data side (issue #11, items 8-11): each test injects the fault and asserts the outcome.

8  a sizes.json that lies (too many or too few samples) is noticed, counted and warned about;
9  missing and random-bytes shards count as shards and as the samples they were expected to hold (pre-flight);
10 two workers, a truncated shard and --max-bad-fraction 1: the readable samples train, no abort;
11 EXIF orientation is applied by the loader, the evaluator and make_shards alike.
"""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image, ImageOps

from data_tools import make_shards
from tests.test_data_fixtures import IdTokenizer, cfg, collect, preprocess, resumed, write_shards
from vlp.data.errors import DataError
from vlp.data.pipeline import build_train_loader


def _ids(batches):
    return [int(i) for _, t in batches for i in t[:, 0]]


def _set_size(folder, name, n):
    sizes = json.loads((folder / "sizes.json").read_text())
    sizes[name] = n
    (folder / "sizes.json").write_text(json.dumps(sizes))


# ---- 8: a lying sizes.json ----------------------------------------------------------------------------

def test_size_file_claiming_phantom_samples_is_counted_and_stops_the_run(tmp_path, capfd):
    write_shards(tmp_path / "sh", 40, 10)
    _set_size(tmp_path / "sh", "00001.tar", 400)           # holds 10
    spec = str(tmp_path / "sh" / "{00000..00003}.tar")
    c = cfg(spec, batch_size=4, workers=2, max_bad_fraction=0.05)
    with pytest.raises(DataError) as e:
        collect(build_train_loader(c, preprocess(), IdTokenizer()))
    assert "\n" not in str(e.value) and "size_mismatch" in str(e.value)
    err = capfd.readouterr().err
    assert err.count("00001.tar: the size file says 400 samples, the shard holds 10") == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_accepted_phantom_samples_are_not_made_up_by_repeats(tmp_path, capfd, workers):
    """--max-bad-fraction raised to accept a shard claiming 400 samples that holds 10: the epoch ends early
    (each sample at most once) instead of repeating the real samples ~10x to fill the claim; exact resume."""
    write_shards(tmp_path / "sh", 40, 10)
    _set_size(tmp_path / "sh", "00001.tar", 400)
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=workers, shuffle_buffer=8)
    L = build_train_loader(c, preprocess(), IdTokenizer(), seed=1)
    assert L.batches_per_epoch == 107                       # planned from the claim: 430 // 4
    batches = collect(L)
    ids = _ids(batches)
    assert len(ids) == len(set(ids)), "a sample was repeated to fill the phantom count"
    assert 0 < len(batches) <= 10 and L.skip_counts() == {"size_mismatch": 390}
    assert capfd.readouterr().err.count("says 400 samples, the shard holds 10") == 1
    for k in (1, len(batches) // 2):                        # the early end resumes exactly too
        assert [t.tolist() for _, t in collect(resumed(c, k, seed=1))] == [t.tolist() for _, t in batches[k:]]


def test_size_file_hiding_samples_is_counted_and_warned(tmp_path, capfd):
    write_shards(tmp_path / "sh", 40, 10)
    _set_size(tmp_path / "sh", "00002.tar", 3)             # holds 10: 7 hidden
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=2)
    L = build_train_loader(c, preprocess(), IdTokenizer())
    ids = _ids(collect(L))
    assert L.skip_counts() == {"size_mismatch": 7}
    assert len(ids) == len(set(ids)), "no sample repeated"
    assert capfd.readouterr().err.count("00002.tar: the size file says 3 samples, the shard holds 10") == 1


def test_non_integer_size_is_one_line_error(tmp_path):
    write_shards(tmp_path / "sh", 20, 10)
    _set_size(tmp_path / "sh", "00000.tar", "lots")
    with pytest.raises(DataError, match=r"sizes.json's entry for 00000.tar is 'lots', not a sample count"):
        build_train_loader(cfg(str(tmp_path / "sh" / "{00000..00001}.tar")), preprocess(), IdTokenizer())


# ---- 9: missing and garbage shards ---------------------------------------------------------------------

def test_missing_shards_without_sizes_count_as_their_expected_samples(tmp_path, capfd):
    write_shards(tmp_path / "sh", 40, 10, sizes=False)       # 4 shards of 10, counted by reading
    spec = str(tmp_path / "sh" / "{00000..00005}.tar")     # 00004, 00005 do not exist
    with pytest.raises(DataError) as e:                    # 20 of 60 expected samples > 5 %: refused up front
        build_train_loader(cfg(spec, max_bad_fraction=0.05), preprocess(), IdTokenizer())
    assert "2 of 6 shards cannot be read (2 missing" in str(e.value) and "\n" not in str(e.value)
    L = build_train_loader(cfg(spec, batch_size=4, workers=2), preprocess(), IdTokenizer())
    assert "pre-flight: 2 of 6 shards cannot be read" in capfd.readouterr().err
    collect(L)
    assert L.skip_counts() == {"missing_shard": 20}


def test_random_bytes_shard_is_counted_and_reported_before_training(tmp_path, capfd):
    write_shards(tmp_path / "sh", 30, 10, sizes=False)
    (tmp_path / "sh" / "00001.tar").write_bytes(bytes(range(256)) * 16)
    spec = str(tmp_path / "sh" / "{00000..00002}.tar")
    with pytest.raises(DataError, match=r"1 of 3 shards cannot be read \(0 missing, 1 not a tar"):
        build_train_loader(cfg(spec, max_bad_fraction=0.2), preprocess(), IdTokenizer())
    L = build_train_loader(cfg(spec, batch_size=4, workers=0), preprocess(), IdTokenizer())
    assert "1 not a tar" in capfd.readouterr().err
    collect(L)
    assert L.skip_counts() == {"bad_tar": 10}


# ---- 10: two workers, a truncated shard, --max-bad-fraction 1 --------------------------------------------

def _truncate_after(path, n_samples):
    with tarfile.open(path) as tf:
        first = [m for m in tf.getmembers() if m.name.startswith(f"{n_samples:06d}")][0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[:first.offset_data + 100])   # inside the first member's data


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_with_two_workers_trains_on_what_is_readable(tmp_path, workers):
    paths = write_shards(tmp_path / "sh", 24, 24)
    _truncate_after(paths[0], 8)                           # samples 8..23 lost; worker 1's share lies in them
    c = cfg(paths[0], batch_size=4, workers=workers, max_bad_fraction=1.0)
    L = build_train_loader(c, preprocess(), IdTokenizer(), seed=2)
    batches = collect(L)
    ids = _ids(batches)
    assert 1 <= len(batches) <= 2 and len(ids) == len(set(ids)) and set(ids) <= set(range(8))
    # counted as far as the workers got before the epoch ended (worker 1's 12 at least)
    assert set(L.skip_counts()) == {"truncated_tar"} and 12 <= L.skip_counts()["truncated_tar"] <= 16


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_trains_no_sample_twice_in_an_epoch(tmp_path, workers):
    """Issue 22.11: 6 shards of unique captions, one cut in half, --max-bad-fraction 1: before, the workers
    topped up the lost samples by drawing their own share again (50 of 592 samples trained twice); now each caption
    is seen at most once in the epoch, and the early end resumes exactly."""
    paths = write_shards(tmp_path / "sh", 96, 16)
    _truncate_after(paths[2], 40)                          # samples 40..47 lost
    c = cfg(str(tmp_path / "sh" / "{00000..00005}.tar"), batch_size=4, workers=workers, shuffle_buffer=8)
    for epoch in (0, 1):
        L = build_train_loader(c, preprocess(), IdTokenizer(), seed=3)
        L.set_epoch(epoch)
        batches = collect(L)
        seen = Counter(_ids(batches))
        assert max(seen.values()) == 1, f"trained twice: {[i for i, n in seen.items() if n > 1]}"
        assert not set(seen) & set(range(40, 48)) and set(L.skip_counts()) <= {"truncated_tar"}
        assert len(batches) >= (88 // 4) // 2
        k = len(batches) // 2
        again = collect(resumed(c, k, seed=3, epoch=epoch))
        assert [t.tolist() for _, t in again] == [t.tolist() for _, t in batches[k:]]


# ---- 11: EXIF orientation --------------------------------------------------------------------------------

def _rotated_jpeg(size):
    """Stored: left half red, right half blue, EXIF orientation 6 (to be turned 90 degrees clockwise):
    upright, the top is red and the bottom blue."""
    w, h = size
    im = Image.new("RGB", (w, h), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, w // 2, h))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _top_red_bottom_blue(x: torch.Tensor) -> bool:
    h = x.shape[-2]
    top, bottom = x[..., : h // 3, :].float().mean(dim=(-1, -2)), x[..., -h // 3:, :].float().mean(dim=(-1, -2))
    return bool(top[0] > top[2] + 0.5 and bottom[2] > bottom[0] + 0.5)


@pytest.mark.parametrize("stored", [(40, 24), (480, 300)])   # full decode, and JPEG draft (DCT-scaled) decode
def test_exif_orientation_is_applied_by_loader_and_eval(tmp_path, stored):
    from vlp.eval.datasets import Sample, decode_image

    data = _rotated_jpeg(stored)
    write_shards(tmp_path / "sh", 8, 8, bad={i: {"jpg": data} for i in range(8)})
    x, _ = collect(build_train_loader(cfg(str(tmp_path / "sh" / "00000.tar"), batch_size=8, workers=0),
                                      preprocess(), IdTokenizer()))[0]
    assert all(_top_red_bottom_blue(img) for img in x)
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    got = decode_image(Sample("k", 0, data=data))
    assert got.size == ref.size == stored[::-1]
    assert torch.equal(torch.tensor(list(got.getdata())), torch.tensor(list(ref.getdata())))


def test_make_shards_reencoding_keeps_the_orientation(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_rotated_jpeg((480, 300)))
    (tmp_path / "data.csv").write_text("filepath,caption\nimgs/a.jpg,a rotated photo\n")
    assert make_shards.main(["--input", str(tmp_path / "data.csv"), "--output", str(tmp_path / "sh"),
                             "--resize-max", "240", "--no-progress"]) == 0
    with tarfile.open(next((tmp_path / "sh").glob("*.tar"))) as tf:
        jpg = next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg"))
    im = Image.open(io.BytesIO(jpg))
    assert im.size == (150, 240)                           # upright: taller than wide
    x = torch.tensor(list(ImageOps.exif_transpose(im).convert("RGB").getdata())).view(240, 150, 3).permute(2, 0, 1)
    assert _top_red_bottom_blue(x / 255.0 * 10)


# ---- issue 22.12: resume after the shard list changed -----------------------------------------------------

def test_resume_on_a_changed_shard_list_is_refused_in_one_line(tmp_path):
    """Before: saved on 4 shards, resumed on 6: no line, exit 0, 110 samples trained twice and 118 never."""
    write_shards(tmp_path / "sh", 60, 10)
    c4 = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=2)
    L = build_train_loader(c4, preprocess(), IdTokenizer())
    it = iter(L)
    next(it)
    state = json.loads(json.dumps(L.state_dict()))
    it.close()
    assert state["shards"].startswith("4 shards, ")
    c6 = cfg(str(tmp_path / "sh" / "{00000..00005}.tar"), batch_size=4, workers=2)
    R = build_train_loader(c6, preprocess(), IdTokenizer())
    with pytest.raises(DataError) as e:
        R.load_state_dict(state)
    assert "\n" not in str(e.value) and "the shard list changed" in str(e.value) and "saved 4 shards" in str(e.value)
    _set_size(tmp_path / "sh", "00001.tar", 9)                 # same names, a size changed: the plan changes too
    with pytest.raises(DataError, match="the shard list changed"):
        build_train_loader(c4, preprocess(), IdTokenizer()).load_state_dict(state)
    _set_size(tmp_path / "sh", "00001.tar", 10)
    moved = tmp_path / "moved"
    (tmp_path / "sh").rename(moved)                            # the same shards read from a new place resume
    build_train_loader(cfg(str(moved / "{00000..00003}.tar"), batch_size=4, workers=2), preprocess(),
                       IdTokenizer()).load_state_dict(state)
    del state["shards"]                                         # a state saved before the hash was recorded
    build_train_loader(cfg(str(moved / "{00000..00005}.tar"), batch_size=4, workers=2), preprocess(),
                       IdTokenizer()).load_state_dict(state)
