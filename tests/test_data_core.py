"""The one data core: one image-extension rule for train and eval, one spec resolver, img2dataset output as written."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tests.test_data_fixtures import IdTokenizer, cfg, collect, jpeg, preprocess, write_shards
from vlp.data.errors import DataError
from vlp.data.pipeline import build_train_loader
from vlp.data.shards import load_shards, resolve
from vlp.data.tario import ShardWriter


def _png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_sample_with_jpg_and_png_gives_the_same_image_to_train_and_eval(tmp_path):
    from vlp.eval.datasets import decode_image, open_eval_set

    dark_jpg = jpeg(0, (40, 30))   # id 0 is black; the png is bright blue
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    with ShardWriter(str(root / "test" / "0.tar"), 100) as w:
        for i in range(8):
            w.write(f"{i:04d}", {"png": _png((0, 0, 255)), "jpg": dark_jpg, "cls": b"0", "txt": f"cap {i} x".encode()})
    (root / "test" / "nshards.txt").write_text("1")
    (root / "classnames.txt").write_text("thing\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    es = open_eval_set(str(root))
    ev = decode_image(es.samples()[0])
    assert ev.getpixel((5, 5))[2] < 50, "eval decodes the jpg"
    x, _ = collect(build_train_loader(cfg(str(root / "test" / "0.tar"), batch_size=8, workers=0),
                                      preprocess(), IdTokenizer()))[0]
    assert (x[:, 2] < 0).all(), "train decodes the jpg as well (blue channel below the mean everywhere)"


def test_resolve_expands_braces_sources_globs_folders_and_keeps_urls(tmp_path):
    write_shards(tmp_path / "a", 20, 10)
    write_shards(tmp_path / "b", 30, 10)
    spec = f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/b/::{tmp_path}/b/0000[01].tar::pipe:cat {tmp_path}/a/0000{{0..1}}.tar"
    got = resolve(spec)
    assert [len(s) for s in got] == [2, 3, 2, 2]
    assert got[1][0].endswith("b/00000.tar") and got[3][1] == f"pipe:cat {tmp_path}/a/00001.tar"
    assert resolve("https://h/x/{0..2}.tar") == [["https://h/x/0.tar", "https://h/x/1.tar", "https://h/x/2.tar"]]
    with pytest.raises(DataError, match="no shard matches"):
        resolve(f"{tmp_path}/c/*.tar")
    with pytest.raises(DataError, match="no .tar files"):
        (tmp_path / "empty").mkdir()
        resolve(str(tmp_path / "empty"))


def _img2dataset_folder(root, n_shards=2, per_shard=6):
    """What img2dataset writes: {shard}.tar with jpg/txt/json (url, caption, key, status), {shard}_stats.json and
    {shard}.parquet, and no sizes.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for s in range(n_shards):
        rows = []
        with ShardWriter(str(root / f"{s:05d}.tar"), 10_000) as w:
            for j in range(per_shard + 2):
                key = f"{s:05d}{j:04d}"
                ok = j < per_shard
                rows.append({"key": key, "url": f"http://x/{key}.jpg", "caption": f"cap {s * 100 + j} words",
                             "status": "success" if ok else "failed_to_download"})
                if ok:
                    meta = {"url": rows[-1]["url"], "caption": rows[-1]["caption"], "key": key, "status": "success"}
                    w.write(key, {"jpg": jpeg(j), "json": json.dumps(meta).encode()})   # caption only in the json
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per_shard, "count": per_shard + 2}))
        pq.write_table(pa.Table.from_pylist(rows), root / f"{s:05d}.parquet")


def test_img2dataset_output_read_as_written(tmp_path):
    pytest.importorskip("pyarrow")
    root = tmp_path / "i2d"
    _img2dataset_folder(root)
    assert load_shards(str(root), count_unknown=False).sizes == [6, 6]        # from {shard}_stats.json
    for s in range(2):
        (root / f"{s:05d}_stats.json").unlink()
    assert load_shards(str(root), count_unknown=False).sizes == [6, 6]        # from {shard}.parquet
    L = build_train_loader(cfg(str(root), batch_size=4, workers=0), preprocess(), IdTokenizer())
    ids = sorted(int(i) for _, t in collect(L) for i in t[:, 0])
    assert ids == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104, 105] and L.skip_counts() == {}


def test_shard_reader_streams_like_it_seeks(tmp_path):
    """The reader gives the same samples from a local file and from a pipe, for any start/stop."""
    from vlp.data.tario import read_shard

    paths = write_shards(tmp_path / "sh", 12, 12)
    for a, b in ((0, None), (5, 9), (11, None), (3, 3)):
        local = [(s.index, s.key, s.files) for s in read_shard(paths[0], a, b)]
        piped = [(s.index, s.key, s.files) for s in read_shard(f"pipe:cat {paths[0]}", a, b)]
        assert local == piped and len(local) == (b or 12) - a
    r = read_shard(f"pipe:cat {paths[0]}", 4, None, exts=("txt",))
    assert [s.files for s in r][0] == {"txt": b"cap 4 words"} and r.count == 12
