"""Corrupt inputs: each is skipped under the right reason and counted; too many abort with one line."""
from __future__ import annotations

import json
import os
import random

import pytest

from tests.test_data_fixtures import IdTokenizer, cfg, collect, jpeg, preprocess, write_shards
from vlp.data.errors import DataError
from vlp.data.pipeline import build_train_loader


def test_each_corruption_has_its_reason_and_count(tmp_path):
    good = jpeg(0)
    bad = {
        1: {"jpg": good[: len(good) // 2]},          # truncated JPEG data
        2: {"jpg": good[:200] + b"\x00" * 50 + good[250:400]},  # corrupt JPEG
        3: {"jpg": b"<html>not an image</html>"},   # non-image bytes
        4: {"txt": b"   "},                         # empty caption
        5: {"txt": b"caf\xe9 \xff"},                 # not UTF-8
        6: {"jpg": None},                            # no image member
        7: {"txt": None, "json": None},              # no caption at all
    }
    paths = write_shards(tmp_path / "sh", 40, 10, bad=bad)
    # truncate the last shard in the middle of its 6th sample: samples 35..39 are lost
    data = open(paths[3], "rb").read()
    offsets = []
    import tarfile

    with tarfile.open(paths[3]) as tf:
        offsets = [m.offset for m in tf.getmembers() if m.name.startswith("000035")]
    open(paths[3], "wb").write(data[: offsets[0] + 700])
    # a shard listed in the spec (and in sizes.json) that is missing: its 10 samples are lost
    sizes = json.loads((tmp_path / "sh" / "sizes.json").read_text())
    sizes["00004.tar"] = 10
    (tmp_path / "sh" / "sizes.json").write_text(json.dumps(sizes))
    c = cfg(str(tmp_path / "sh" / "{00000..00004}.tar"), batch_size=4, workers=0, train_num_samples=48)
    L = build_train_loader(c, preprocess(), IdTokenizer())
    batches = collect(L)
    counts = L.skip_counts()
    assert counts == {"corrupt_image": 2, "not_image": 1, "empty_caption": 1, "bad_caption_encoding": 1,
                      "missing_image": 1, "missing_caption": 1, "truncated_tar": 5, "missing_shard": 10}
    ids = [int(i) for _, t in batches for i in t[:, 0]]
    assert not set(ids) & {1, 2, 3, 4, 5, 6, 7, 35, 36, 37, 38, 39}
    assert len(batches) == (48 - 15) // 4 < L.batches_per_epoch == 48 // 4   # the lost 15 not made up by repeats


def test_bad_fraction_aborts_with_one_line(tmp_path):
    bad = {i: {"jpg": b"garbage"} for i in range(0, 40, 3)}
    write_shards(tmp_path / "sh", 40, 10, bad=bad)
    c = cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=2, max_bad_fraction=0.2)
    with pytest.raises(DataError) as e:
        collect(build_train_loader(c, preprocess(), IdTokenizer()))
    msg = str(e.value)
    assert "\n" not in msg and "not_image 14" in msg and "max-bad-fraction" in msg
    # under the threshold the same data trains
    c.max_bad_fraction = 0.5
    L = build_train_loader(c, preprocess(), IdTokenizer())
    collect(L)
    assert L.skip_counts() == {"not_image": 14}


def test_all_bad_worker_share_raises_instead_of_hanging(tmp_path):
    bad = {i: {"txt": b""} for i in range(20)}
    write_shards(tmp_path / "sh", 20, 10, bad=bad)
    c = cfg(str(tmp_path / "sh" / "{00000..00001}.tar"), batch_size=4, workers=0)
    with pytest.raises(DataError):
        collect(build_train_loader(c, preprocess(), IdTokenizer()))


@pytest.mark.parametrize("seed", range(8))
def test_non_tar_file_is_counted(tmp_path, seed):
    write_shards(tmp_path / "sh", 20, 10)
    with open(tmp_path / "sh" / "00001.tar", "wb") as fh:
        fh.write(random.Random(seed).randbytes(4096))  # some fail the octal parse, some the checksum
    c = cfg(str(tmp_path / "sh" / "{00000..00001}.tar"), batch_size=4, workers=0)
    L = build_train_loader(c, preprocess(), IdTokenizer())
    ids = [int(i) for _, t in collect(L) for i in t[:, 0]]
    assert len(ids) == len(set(ids)) == 8                     # the 10 readable samples, none repeated
    assert L.skip_counts() == {"bad_tar": 10}


def test_image_over_the_pixel_limit_is_refused_by_its_header(tmp_path, monkeypatch):
    """Issue 22.18: a 33 kB single-colour 12000x12000 PNG raised a loader process's peak RSS from 1.15 to 1.91 GB
    before it was rejected (benchmarks/huge_image.py: +841 MB before, +0 now). Refused by the header's size, PIL's
    MAX_IMAGE_PIXELS (here lowered so that the test image is small), without decoding."""
    import io

    from PIL import Image

    from vlp.data import images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000 * 800)
    buf = io.BytesIO()
    Image.new("RGB", (1000, 801), (40, 90, 200)).save(buf, format="PNG")
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im.size) or real_load(im))
    with pytest.raises(images.E.SkipSample) as e:
        images.decode_rgb(buf.getvalue())
    assert e.value.reason == "image_too_large" and decoded == []
    write_shards(tmp_path / "sh", 20, 10, bad={3: {"jpg": None, "png": buf.getvalue()}})
    c = cfg(str(tmp_path / "sh" / "{00000..00001}.tar"), batch_size=4, workers=0)
    L = build_train_loader(c, preprocess(), IdTokenizer())
    ids = [int(i) for _, t in collect(L) for i in t[:, 0]]
    assert L.skip_counts() == {"image_too_large": 1} and 3 not in ids and (1000, 801) not in decoded
