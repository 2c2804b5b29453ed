"""Evaluation sets: CLIP_benchmark's webdataset layout, ImageNet-style image folders, caption files.

An eval set is named by a *spec* string: a path, optionally followed by `?key=value&key=value`:

    /data/wds_imagenet1k                       CLIP_benchmark wds root (task from dataset_type.txt)
    /data/imagenet/val?classnames=imagenet     image folder (one sub-folder per class, sorted)
    /data/coco_val.csv?name=coco&root=/data/coco  image path + caption(s) per row -> retrieval

Keys: `name` (the `dataset` field of the result; default `wds/<folder>` for a wds root, the folder name
for an image folder, the file stem for a caption file), `task` (`zeroshot_classification` or
`zeroshot_retrieval`; default from the layout), `split` (wds split, default `test`), `classnames`
(a file: one name per line or a JSON list / {dataset: list}; `imagenet` for open_clip's 1000 names;
`folders` to use the sub-folder names), `templates` (a file: one template with `{c}` per line, or JSON list /
{classname: [prompts]} / {dataset: ...}; `openai` (80) or `simple` for open_clip's ImageNet sets),
`root` (folder that relative image paths of a caption file are resolved against; default its folder).

Images are decoded and preprocessed in `iter_batches`; each sample carries its index, so several
workers may decode in parallel while the order of results stays that of the set.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union
from urllib.parse import parse_qsl

import torch

from vlp.data.errors import SkipSample
from vlp.data.images import IMAGE_EXTS, IMAGE_FILE_SUFFIXES, decode_rgb
from vlp.data.tario import TarError, read_shard

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
LINEAR_PROBE = "linear_probe"
KNN = "knn"
CAPTION_SELECTION = "image_caption_selection"     # CLIP_benchmark's name for SugarCrepe-style sets
PROBE_TASKS = (LINEAR_PROBE, KNN)                 # classification layouts scored from a train split's features
LABELLED = (CLASSIFICATION,) + PROBE_TASKS
TASKS = (CLASSIFICATION, RETRIEVAL, LINEAR_PROBE, KNN, CAPTION_SELECTION)
SPEC_KEYS = {"name", "task", "split", "classnames", "templates", "root", "train_split", "train", "fewshot_k"}
CAPTION_FILE_EXTS = {".csv", ".tsv", ".jsonl", ".json"}

Template = Union[str, Callable[[str], str]]


class EvalError(ValueError):
    """Bad evaluation input (missing class names, empty set, undecodable image...); the message is one line."""


@dataclass
class Sample:
    """One image to score: where its bytes come from, and its class index or its captions."""

    key: str
    target: Union[int, list[str]]
    data: Optional[bytes] = None     # raw bytes ...
    path: Optional[str] = None       # ... or a file (image folder, caption file) ...
    span: Optional[tuple[int, int]] = None   # ... or (offset, size) of the image inside tar `path` (wds)
    where: str = ""                  # shard or file, for error messages


@dataclass
class EvalSet:
    spec: str
    name: str
    task: str
    kind: str                        # "wds", "folder", "captions"
    root: Path
    classnames: Optional[list[str]] = None
    templates: Optional[Union[list[Template], dict[str, list[str]]]] = None
    options: dict[str, str] = field(default_factory=dict)
    _samples: Optional[list[Sample]] = field(default=None, repr=False)

    def samples(self) -> list[Sample]:
        """All samples, indexed once: labels and captions in memory, images read when decoded."""
        if self._samples is None:
            if self.kind == "wds":
                items = list(_read_wds(self))
            elif self.kind == "folder":
                items = _read_folder(self)
            else:
                items = _read_caption_file(self)
            if not items:
                raise EvalError(f"{self.name}: the eval set is empty ({self.root})")
            if self.task in LABELLED:
                n_cls = len(self.classnames or [])
                bad = next((s for s in items if not 0 <= int(s.target) < n_cls), None)
                if bad is not None:
                    raise EvalError(f"{self.name}: sample {bad.key} has class {bad.target} but there are "
                                    f"{n_cls} class names")
            self._samples = items
        return self._samples

    def fingerprint(self) -> tuple:
        """Identifies the set's content on disk (for caching decoded images)."""
        return (self.spec,) + self.data_fingerprint()

    def data_fingerprint(self) -> tuple:
        """The files (names, times, sizes) and split this set reads, whatever task or name its spec gives."""
        files = [self.root] if self.root.is_file() else sorted(self.root.rglob("*"))[:10000]
        return (self.kind, str(self.root), self.options.get("split"), self.options.get("classnames"),
                tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.is_file()))


# ---------------------------------------------------------------------------------------------- spec

def parse_spec(spec: str) -> tuple[Path, dict[str, str]]:
    path, sep, query = spec.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True)) if sep else {}
    unknown = set(opts) - SPEC_KEYS
    if unknown:
        raise EvalError(f"{spec}: unknown option(s) {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    if "task" in opts and opts["task"] not in TASKS:
        raise EvalError(f"{spec}: task must be one of {TASKS}")
    return Path(path).expanduser(), opts


def open_eval_set(spec: str, classnames: Optional[str] = None, templates: Optional[str] = None) -> EvalSet:
    """Resolve a spec to an eval set and read its metadata (class names, templates); samples load lazily.

    `classnames`/`templates` are defaults for sets whose spec does not name its own (CLI `--classnames`)."""
    path, opts = parse_spec(spec)
    if classnames and "classnames" not in opts:
        opts["classnames"] = classnames
    if templates and "templates" not in opts:
        opts["templates"] = templates
    if not path.exists():
        raise EvalError(f"eval data not found: {path}")
    from vlp.eval import compositional

    if compositional.is_compositional(path, opts):
        return compositional.open_set(spec, path, opts)
    if path.is_file():
        if path.suffix.lower() not in CAPTION_FILE_EXTS:
            raise EvalError(f"{path}: a caption file must be .csv, .tsv, .jsonl or .json")
        es = EvalSet(spec, opts.get("name", path.stem), opts.get("task", RETRIEVAL), "captions", path, options=opts)
        if es.task != RETRIEVAL:
            raise EvalError(f"{spec}: a caption file can only be used for retrieval")
        return es
    split = opts.get("split", "test")
    if (path / split / "nshards.txt").is_file() or (path / "dataset_type.txt").is_file():
        return _open_wds(spec, path, opts, split)
    return _open_folder(spec, path, opts)


def _open_wds(spec: str, root: Path, opts: dict, split: str) -> EvalSet:
    if not (root / split / "nshards.txt").is_file():
        raise EvalError(f"{root}: not a CLIP_benchmark webdataset root (missing {split}/nshards.txt)")
    dtype = "classification"
    if (root / "dataset_type.txt").is_file():
        dtype = (root / "dataset_type.txt").read_text().strip().lower()
    if dtype == "multilabel":
        raise EvalError(f"{root}: multi-label classification sets are not supported")
    task = opts.get("task", RETRIEVAL if dtype == "retrieval" else CLASSIFICATION)
    es = EvalSet(spec, opts.get("name", "wds/" + root.name), task, "wds", root, options=opts)
    if task in LABELLED:
        es.classnames = _classnames(es, root / "classnames.txt")
    if task == CLASSIFICATION:
        es.templates = _templates(es, root / "zeroshot_classification_templates.txt")
    return es


def _open_folder(spec: str, root: Path, opts: dict) -> EvalSet:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise EvalError(f"{root}: neither a CLIP_benchmark wds root nor an image folder with class sub-folders")
    task = opts.get("task", CLASSIFICATION)
    if task not in LABELLED:
        raise EvalError(f"{spec}: an image folder can only be used for classification, linear_probe or knn")
    es = EvalSet(spec, opts.get("name", root.name), task, "folder", root, options=opts)
    es.options["_folders"] = json.dumps(classes)
    if "classnames" not in opts and not (root / "classnames.txt").is_file() and len(classes) == 1000:
        opts["classnames"] = "imagenet"
    es.classnames = _classnames(es, root / "classnames.txt", folders=classes)
    if len(es.classnames) != len(classes):
        raise EvalError(f"{es.name}: {len(es.classnames)} class names for {len(classes)} class folders")
    if task == CLASSIFICATION:
        es.templates = _templates(es, root / "zeroshot_classification_templates.txt", default="openai")
    return es


def open_train_split(es: EvalSet) -> EvalSet:
    """The train split of a linear-probe / k-NN set: a wds root's `train_split` (default `train`), or an image
    folder's `train=FOLDER` (default: a sibling `train` folder of a `test`/`val` folder), with the same
    class names."""
    opts = {k: v for k, v in es.options.items() if not k.startswith("_")}
    opts["task"] = es.task
    if es.kind == "wds":
        split = opts.pop("train_split", "train")
        opts["split"] = split
        root = es.root
    elif es.kind == "folder":
        root = Path(opts.pop("train")) if "train" in opts else es.root.parent / "train"
        if "train" not in es.options and es.root.name not in ("test", "val"):
            raise EvalError(f"{es.name}: give train=FOLDER (the training images of this linear probe / k-NN set)")
    else:
        raise EvalError(f"{es.name}: {es.task} needs a classification layout (wds root or image folder)")
    if es.kind == "wds" and not (root / opts["split"] / "nshards.txt").is_file():
        raise EvalError(f"{es.name}: {es.task} needs a train split: missing {root / opts['split'] / 'nshards.txt'} "
                        f"(give train_split=NAME)")
    if not root.is_dir():
        raise EvalError(f"{es.name}: train folder not found: {root}")
    if es.kind == "wds":
        train = _open_wds(es.spec, root, opts, opts["split"])
    else:
        train = _open_folder(es.spec, root, {**opts, "classnames": "folders"})
    train.classnames = es.classnames
    if es.kind == "folder" and json.loads(train.options["_folders"]) != json.loads(es.options["_folders"]):
        raise EvalError(f"{es.name}: the train folder {root} has other class folders than {es.root}")
    return train


# ------------------------------------------------------------------------------- class names, templates

def _classnames(es: EvalSet, default_file: Path, folders: Optional[list[str]] = None) -> list[str]:
    src = es.options.get("classnames")
    if src == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if src == "folders":
        if folders is None:
            raise EvalError(f"{es.name}: classnames=folders only applies to image folders")
        return list(folders)
    path = Path(src) if src else default_file
    if not path.is_file():
        hint = "give classnames=FILE, classnames=imagenet or classnames=folders" if folders is not None \
            else f"expected {default_file}"
        raise EvalError(f"{es.name}: no class names ({hint})")
    names = _read_list(path, es.name)
    if not names:
        raise EvalError(f"{es.name}: class name file {path} is empty")
    return [str(n).strip() for n in names]


def _templates(es: EvalSet, default_file: Path, default: Optional[str] = None):
    src = es.options.get("templates")
    if src is None and not default_file.is_file():
        src = default
    if src in ("openai", "simple"):
        from open_clip import zero_shot_metadata as zm

        return list(zm.OPENAI_IMAGENET_TEMPLATES if src == "openai" else zm.SIMPLE_IMAGENET_TEMPLATES)
    path = Path(src) if src else default_file
    if not path.is_file():
        raise EvalError(f"{es.name}: no zero-shot templates (expected {path}; or give templates=openai)")
    if path.suffix.lower() == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and es.classnames and set(es.classnames) <= set(data):
            return {c: list(data[c]) for c in es.classnames}        # class-specific prompts (CuPL)
        if isinstance(data, dict):
            data = _dataset_entry(data, es.name, f"{es.name}: template file {path} has no entry for this dataset")
        if isinstance(data, dict):
            return {c: list(data[c]) for c in es.classnames or []}
        templates = list(data)
    else:
        templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not templates:
        raise EvalError(f"{es.name}: template file {path} is empty")
    return templates


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e.msg})") from None


def _dataset_entry(data: dict, name: str, missing: str):
    """A `{dataset: ...}` file's entry for `name` (with or without its `wds/` prefix); EvalError(missing) if none."""
    for key in (name, name.removeprefix("wds/")):
        if key in data:
            return data[key]
    raise EvalError(missing)


def _read_list(path: Path, name: str) -> list:
    if path.suffix.lower() == ".json":
        data = _load_json(path)
        if isinstance(data, dict):
            return list(_dataset_entry(data, name, f"{path}: no entry for dataset '{name}'"))
        return list(data)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def fill_templates(classnames: list[str], templates) -> tuple[list[str], list[int]]:
    """All prompts, class by class, and how many each class has (same order as CLIP_benchmark)."""
    prompts: list[str] = []
    counts: list[int] = []
    for c in classnames:
        if isinstance(templates, dict):
            texts = list(templates[c])
        else:
            texts = [t(c) if callable(t) else t.format(c=c) for t in templates]
        if not texts:
            raise EvalError(f"no prompts for class '{c}'")
        prompts.extend(texts)
        counts.append(len(texts))
    return prompts, counts


# ------------------------------------------------------------------------------------------ readers

def _read_wds(es: EvalSet) -> Iterator[Sample]:
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


def _read_folder(es: EvalSet) -> list[Sample]:
    classes = json.loads(es.options["_folders"])
    out = []
    for ci, c in enumerate(classes):
        for p in sorted((es.root / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_FILE_SUFFIXES:
                out.append(Sample(str(p.relative_to(es.root)), ci, path=str(p), where=str(p)))
    return out


_IMAGE_COLS = ("image", "filepath", "image_path", "path", "file", "filename", "img")
_CAPTION_COLS = ("caption", "captions", "text", "title", "txt", "sentence", "sentences")


def _read_caption_file(es: EvalSet) -> list[Sample]:
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
            caps = [caps] if isinstance(caps, str) else [str(c) for c in caps]
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


# ------------------------------------------------------------------------------------------ decoding

def decode_image(sample: Sample):
    """RGB PIL image, decoded as the training loader decodes (`vlp.data.images.decode_rgb`: EXIF orientation applied)."""
    try:
        data = sample.data
        if data is None:
            with open(sample.path, "rb") as fh:
                if sample.span is not None:
                    fh.seek(sample.span[0])
                    data = fh.read(sample.span[1])
                else:
                    data = fh.read()
        return decode_rgb(data)
    except (SkipSample, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise EvalError(f"cannot decode image {sample.key} ({sample.where}): {first}") from None


class _Decoded(torch.utils.data.IterableDataset):
    """Decode + preprocess; worker w takes samples w, w+W, ... and tags each with its index."""

    def __init__(self, samples: list[Sample], preprocess: Callable):
        self.samples, self.preprocess = samples, preprocess

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in range(wid, len(self.samples), nw):
            try:
                x = self.preprocess(decode_image(self.samples[i]))
            except EvalError as e:
                yield i, None, str(e)        # raised in the main process, so the message stays one line
                return
            yield i, x, None


def _collate(batch):
    return batch



def iter_batches(samples: list[Sample], preprocess: Callable, batch_size: int, num_workers: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices [B], images [B,3,H,W]) batches; with workers the order of batches may interleave."""
    ds = _Decoded(samples, preprocess)
    if num_workers > 0:
        per_worker = (len(samples) + num_workers - 1) // num_workers
        num_workers = max(1, min(num_workers, per_worker // 8 or 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                         persistent_workers=False)
    for batch in loader:
        for _, x, err in batch:
            if err is not None:
                raise EvalError(err)
        idx = torch.tensor([b[0] for b in batch], dtype=torch.long)
        yield idx, torch.stack([b[1] for b in batch])
