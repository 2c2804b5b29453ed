"""A real shard holding a GIF, a WebP, a 1x1 image, a 20000x2 image and a 1 MB caption among ordinary samples:
the console names the skip (by reason, at each epoch end and in the summary) and the samples trained on but
changed (the caption cut before tokenizing, the extreme aspect ratio); before, it trained with rc 0 and no word
(the skip was only in metrics.jsonl)."""
from __future__ import annotations

import io
import random
import re

from PIL import Image

from vlp.config import parse_config
from vlp.data import demo_world as W
from vlp.data.oddities import MAX_CAPTION_CHARS, cut_caption
from vlp.data.tario import ShardWriter
from vlp.train.loop import train


def _encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _odd_shard(path) -> int:
    rng = random.Random(0)
    odd = {
        "gif": {"gif": _encoded(Image.new("P", (32, 32), 3), "GIF"), "txt": b"a gif"},
        "webp": {"webp": _encoded(Image.new("RGB", (32, 32), (200, 10, 10)), "WEBP"), "txt": b"a red webp"},
        "one_pixel": {"png": _encoded(Image.new("RGB", (1, 1), (0, 0, 255)), "PNG"), "txt": b"a blue pixel"},
        "strip": {"png": _encoded(Image.new("RGB", (20000, 2), (0, 200, 0)), "PNG"), "txt": b"a green strip"},
        "long_caption": {"png": W.encode_png(W.render(W.random_scene(rng), 32, rng)),
                         "txt": ("word " * 200_000).encode()},
    }
    with ShardWriter(str(path / "%05d.tar"), 1000) as sink:
        for key, files in odd.items():   # first: every epoch reads them (40 of the 45 samples make its 5 batches)
            sink.write(key, files)
        for i in range(40):
            things = W.random_scene(rng)
            sink.write(f"s{i:04d}", {"png": W.encode_png(W.render(things, 32, rng)),
                                     "txt": W.phrasings(things, rng)[0].encode()})
    return 45


def test_odd_shard_is_reported_on_the_console(tmp_path, micro_model_json, capsys):
    n = _odd_shard(tmp_path)
    train(parse_config(["--train-data", str(tmp_path / "00000.tar"), "--train-num-samples", str(n), "--model",
                        micro_model_json, "--logs", str(tmp_path / "logs"), "--batch-size", "8", "--workers", "0",
                        "--epochs", "2", "--report-to", "none", "--no-progress", "--warmup", "1",
                        "--shuffle-buffer", "0"]))
    err = capsys.readouterr().err
    for epoch in (0, 1):
        line = next((ln for ln in err.splitlines() if ln.startswith(f"epoch {epoch}: ")), None)
        assert line is not None, err
        assert re.search(r"1 sample\(s\) skipped \(missing_image 1: no \.jpg, \.jpeg, \.png, \.webp member: a \.gif", line)
        assert "caption_cut 1: caption cut to" in line and "extreme_aspect 1: aspect ratio over 10:1" in line, line
    assert "  in all: 2 sample(s) skipped (missing_image 2" in err and "caption_cut 2" in err, err
    # the first of each change is named once, with the sample
    assert len(re.findall(r"note: sample long_caption: its 99\d,\d{3}-character caption is cut", err)) == 1, err
    assert err.count("note: sample strip is 20000x2 pixels") == 1, err


def test_caption_cut_keeps_ordinary_captions():
    assert cut_caption("a photo of a cat", "k") == ("a photo of a cat", None)
    text, note = cut_caption("x" * (MAX_CAPTION_CHARS + 5), "k")
    assert len(text) == MAX_CAPTION_CHARS and note[0] == "counted:caption_cut:k"
