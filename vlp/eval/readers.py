"""Index the samples of an eval set: labels and captions read now, images only located (decoded later).

One reader per layout: CLIP_benchmark's webdataset root (`read_wds`), an image folder with one sub-folder
per class (`read_folder`), a CSV/TSV/JSONL/JSON caption file (`read_caption_file`). Each takes the opened
`EvalSet` and returns its `Sample`s in order; bad input raises `EvalError` (one line).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

from vlp.data.images import IMAGE_EXTS, IMAGE_FILE_SUFFIXES
from vlp.data.tario import TarError, read_shard
from vlp.eval.evalset import RETRIEVAL, EvalError, EvalSet, Sample


def read_wds(es: EvalSet) -> Iterator[Sample]:
    split = es.options.get("split", "test")
    sdir = es.root / split
    try:
        n = int((sdir / "nshards.txt").read_text().strip())
    except ValueError:
        raise EvalError(f"{sdir / 'nshards.txt'}: not a number") from None
    for i in range(n):
        shard = sdir / f"{i}.tar"
        try:
            # labels/captions are read now, images only located (offset, size) and read when decoded
            for s in read_shard(str(shard), exts=("txt", "cls"), spans=IMAGE_EXTS):
                if not os.path.basename(s.key).startswith("__"):
                    yield _wds_sample(es, s, shard)
        except TarError as e:
            what = "shard missing" if e.kind == "missing" else "cannot read shard"
            raise EvalError(f"{es.name}: {what}: {shard} ({e.kind} after {e.next_index} samples)") from None


def _wds_sample(es: EvalSet, s, shard: Path) -> Sample:
    """An eval Sample from a shard sample; its image chosen by the loader's rule (`vlp.data.images.image_ext`)."""
    ext, key, rec = s.image_ext, s.key, s.files
    if ext is None:
        raise EvalError(f"{es.name}: sample {key} in {shard} has no image ({'/'.join(IMAGE_EXTS)})")
    where = dict(path=str(shard), span=s.spans[ext]) if ext in s.spans else dict(data=rec[ext])
    if es.task == RETRIEVAL:
        if "txt" not in rec:
            raise EvalError(f"{es.name}: sample {key} in {shard} has no .txt captions")
        try:
            captions = rec["txt"].decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise EvalError(f"{es.name}: the captions of sample {key} in {shard} are not UTF-8") from None
        return Sample(key, captions, where=str(shard), **where)
    if "cls" not in rec:
        raise EvalError(f"{es.name}: sample {key} in {shard} has no .cls label")
    try:
        label = int(rec["cls"].decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise EvalError(f"{es.name}: sample {key} in {shard} has a non-integer .cls") from None
    return Sample(key, label, where=str(shard), **where)


def read_folder(es: EvalSet) -> list[Sample]:
    classes = json.loads(es.options["_folders"])
    out = []
    for ci, c in enumerate(classes):
        for p in sorted((es.root / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_FILE_SUFFIXES:
                out.append(Sample(str(p.relative_to(es.root)), ci, path=str(p), where=str(p)))
    return out


_IMAGE_COLS = ("image", "filepath", "image_path", "path", "file", "filename", "img")
_CAPTION_COLS = ("caption", "captions", "text", "title", "txt", "sentence", "sentences")


def read_caption_file(es: EvalSet) -> list[Sample]:
    path = es.root
    base = Path(es.options.get("root", path.parent))
    groups: dict[str, list[str]] = {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise EvalError(f"{path}:{line}: captions are not UTF-8 text (byte {e.start}); "
                        f"re-encode the file as UTF-8") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        try:
            rows = json.loads(text) if path.suffix.lower() == ".json" else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise EvalError(f"{path}: entry {i + 1} is not an object")
            img = next((row[k] for k in _IMAGE_COLS if k in row), None)
            caps = next((row[k] for k in _CAPTION_COLS if k in row), None)
            if img is None or caps is None:
                raise EvalError(f"{path}: entry {i + 1} needs an image key ({_IMAGE_COLS[0]}) and a caption key "
                                f"({_CAPTION_COLS[0]}/{_CAPTION_COLS[1]})")
            if isinstance(caps, str):
                caps = [caps]
            elif isinstance(caps, list) and all(isinstance(c, str) for c in caps):
                caps = list(caps)
            else:
                raise EvalError(f"{path}: entry {i + 1}: a caption must be text or a list of texts, "
                                f"not {json.dumps(caps)[:60]}")
            groups.setdefault(str(img), []).extend(caps)
    else:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim))
        if not rows:
            raise EvalError(f"{path}: the caption file is empty")
        header = [h.strip().lower() for h in rows[0]]
        icol = next((header.index(k) for k in _IMAGE_COLS if k in header), None)
        ccols = [i for i, h in enumerate(header) if h in _CAPTION_COLS or re.fullmatch(r"caption_?\d+", h)]
        if icol is None or not ccols:
            icol, ccols = 0, list(range(1, len(rows[0])))   # no header: image, caption[, caption ...]
        else:
            rows = rows[1:]
        for i, row in enumerate(rows):
            if not row:
                continue
            if len(row) < 2:
                raise EvalError(f"{path}: row {i + 1} needs an image path and a caption")
            caps = [line for c in ccols if c < len(row) for line in row[c].splitlines() if line.strip()]
            groups.setdefault(row[icol], []).extend(caps)
    out = []
    for img, caps in groups.items():
        p = Path(img) if os.path.isabs(img) else base / img
        out.append(Sample(img, caps, path=str(p), where=str(p)))
    return out
