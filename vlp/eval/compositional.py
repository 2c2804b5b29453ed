"""Compositional hard negatives: does an image score its caption above captions that rearrange its words?

Sets (task `image_caption_selection`, CLIP_benchmark's name for SugarCrepe):

- SugarCrepe's JSON layout, one file per subset: `{id: {"filename", "caption", "negative_caption"}}`
  (`negative_caption` may also be a list); the subset is the file stem (`replace_obj.json` -> `replace_obj`).
  A spec names one file, or a folder of such files (every `*.json` in it is a subset).
- A CSV/TSV form: columns `filename` (or `image`), `caption`, one or more `negative_caption*` columns, and an
  optional `subset` column (default: the file stem).

Image paths are relative to `root=` (default: the folder of the annotation file(s)); for SugarCrepe that is
COCO's `val2017` folder.

Metric: the share of images whose positive caption scores at least as high as every negative (`acc`, as
CLIP_benchmark's `image_caption_selection`: its argmax keeps index 0, the positive, on an exact tie; with
`ties="positive_wins"` a negative must score more than `retrieval.TIE_TOL` above it), overall, per
subset (`acc/<subset>`) and, where subsets are named SugarCrepe's way (`{replace,swap,add}_{obj,att,rel}`),
per operation and per kind (`acc/replace`, `acc/object`, ...).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import torch

from vlp.eval.evalset import CAPTION_SELECTION, EvalError, EvalSet, Sample
from vlp.eval.retrieval import TIE_RULES, TIE_TOL

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
_OPS = ("replace", "swap", "add")
_KINDS = {"obj": "object", "att": "attribute", "rel": "relation"}
_IMAGE_COLS = ("filename", "image", "filepath", "image_path", "path")
_NEG = re.compile(r"^negative_captions?(_?\d+)?$")


def _is_sugarcrepe_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict) or not data:
        return False
    first = next(iter(data.values()))
    return isinstance(first, dict) and "negative_caption" in first


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            row = next(csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])
    except (OSError, UnicodeDecodeError):
        return []
    return [h.strip().lower() for h in row]


def is_compositional(path: Path, opts: dict) -> bool:
    """Whether a spec names a compositional set (by `task=` or by its content)."""
    if opts.get("task") == CAPTION_SELECTION:
        return True
    if "task" in opts:
        return False
    if path.is_file():
        if path.suffix.lower() == ".json":
            return _is_sugarcrepe_json(path)
        if path.suffix.lower() in (".csv", ".tsv"):
            return any(_NEG.match(h) for h in _csv_header(path))
        return False
    if path.is_dir() and not (path / "dataset_type.txt").exists():
        files = sorted(path.glob("*.json"))
        return bool(files) and any(f.stem in SUGARCREPE_SUBSETS for f in files) and _is_sugarcrepe_json(files[0])
    return False


def open_set(spec: str, path: Path, opts: dict):
    """An `EvalSet` (kind `compositional`) whose samples carry [positive, negative, ...] captions; the subset
    is the part of each sample's key before the first '/'."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
        files += sorted(path.glob("*.csv")) + sorted(path.glob("*.tsv"))
        if not files:
            raise EvalError(f"{path}: no SugarCrepe JSON or CSV annotation files in it")
    else:
        files = [path]
    base = Path(opts.get("root", path if path.is_dir() else path.parent))
    samples = []
    for f in files:
        for subset, key, image, captions in _read(f):
            p = Path(image) if Path(image).is_absolute() else base / image
            samples.append(Sample(f"{subset}/{key}", captions, path=str(p), where=str(p)))
    if not samples:
        raise EvalError(f"{path}: the compositional set is empty")
    name = opts.get("name", path.stem if path.is_file() else path.name)
    es = EvalSet(spec, name, CAPTION_SELECTION, "compositional", path, options=opts)
    es._samples = samples
    return es


def _read(path: Path):
    """(subset, id, image, [positive, negatives...]) rows of one annotation file."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvalError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise EvalError(f"{path}: expected SugarCrepe's layout {{id: {{filename, caption, negative_caption}}}}")
        for key, row in data.items():
            if not isinstance(row, dict) or not all(k in row for k in ("filename", "caption", "negative_caption")):
                raise EvalError(f"{path}: entry {key} needs filename, caption and negative_caption")
            negs = row["negative_caption"]
            negs = [negs] if isinstance(negs, str) else [str(n) for n in negs]
            if not negs:
                raise EvalError(f"{path}: entry {key} has no negative caption")
            yield path.stem, str(key), str(row["filename"]), [str(row["caption"])] + negs
        return
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter=delim))
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise EvalError(f"{path}: the file is empty")
    header = [h.strip().lower() for h in rows[0]]
    icol = next((header.index(c) for c in _IMAGE_COLS if c in header), None)
    ncols = [i for i, h in enumerate(header) if _NEG.match(h)]
    if icol is None or "caption" not in header or not ncols:
        raise EvalError(f"{path}: needs a header with filename (or image), caption and negative_caption columns")
    ccol, scol = header.index("caption"), header.index("subset") if "subset" in header else None
    for i, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise EvalError(f"{path}: line {i} has {len(row)} fields, the header {len(header)}")
        negs = [row[c] for c in ncols if row[c].strip()]
        if not negs:
            raise EvalError(f"{path}: line {i} has no negative caption")
        yield (row[scol] if scol is not None else path.stem), str(i - 1), row[icol], [row[ccol]] + negs


def selection_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      is_positive: torch.Tensor, subsets: list[str], ties: str = TIE_RULES[0]) -> dict[str, float]:
    """`acc` overall and per subset/group. Captions are rows of `text_emb`; `text_to_image` names each caption's
    image and `is_positive` marks the one positive caption of each image.

    `clip_benchmark` scores as CLIP_benchmark does: one [1, D] x [D, captions] product per image and its argmax
    (the first on an exact tie, the positive when it comes first). That product can give two identical captions
    scores that differ in the last bit, so a negative that equals the caption wins or loses as that bit falls,
    in CLIP_benchmark and here alike. `positive_wins`: every score is the same elementwise dot product, and a
    negative must beat the positive by more than `TIE_TOL`."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, not {ties!r}")
    n = image_emb.shape[0]
    img, txt = image_emb.float(), text_emb.float()
    if ties == "clip_benchmark":
        order = torch.argsort(text_to_image, stable=True)
        counts = torch.bincount(text_to_image, minlength=n).tolist()
        correct, start = torch.zeros(n), 0
        for i, c in enumerate(counts):
            rows = order[start:start + c]
            start += c
            if c:
                scores = img[i:i + 1] @ txt[rows].t()
                correct[i] = float(bool(is_positive[rows[int(scores.argmax(dim=1))]]))
    else:
        scores = (txt * img[text_to_image]).sum(dim=1)
        best_neg = torch.full((n,), float("-inf")).scatter_reduce(
            0, text_to_image[~is_positive], scores[~is_positive], reduce="amax", include_self=True)
        pos = torch.full((n,), float("-inf")).scatter_reduce(
            0, text_to_image[is_positive], scores[is_positive], reduce="amax", include_self=True)
        correct = (pos + TIE_TOL >= best_neg).float()
    out = {"acc": correct.mean().item()}
    names = sorted(set(subsets))
    sub = torch.tensor([names.index(s) for s in subsets])
    if len(names) > 1:
        for i, s in enumerate(names):
            out[f"acc/{s}"] = correct[sub == i].mean().item()
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(names):
        op, _, kind = s.partition("_")
        if op in _OPS and kind in _KINDS:
            groups.setdefault(op, []).append(i)
            groups.setdefault(_KINDS[kind], []).append(i)
    for g, members in groups.items():
        if len(members) < len(names):
            out[f"acc/{g}"] = correct[torch.isin(sub, torch.tensor(members))].mean().item()
    return out
