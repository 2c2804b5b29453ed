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

This module opens a spec into an `EvalSet` (its records are in `vlp.eval.evalset`, its samples are
indexed by `vlp.eval.readers`, its images decoded by `vlp.eval.decode`; the names are re-exported here).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl

from vlp.data.images import IMAGE_FILE_SUFFIXES
from vlp.eval.compositional import is_compositional, open_set as open_compositional_set
from vlp.eval.readers import read_caption_file, read_folder, read_wds
from vlp.eval.decode import decode_image, iter_batches
from vlp.eval.evalset import (CAPTION_FILE_EXTS, CAPTION_SELECTION, CLASSIFICATION, KNN, LABELLED, LINEAR_PROBE,
                              PROBE_TASKS, RETRIEVAL, SPEC_KEYS, TASKS, EvalError, EvalSet, Sample, Template)

__all__ = ["CAPTION_FILE_EXTS", "CAPTION_SELECTION", "CLASSIFICATION", "KNN", "LABELLED", "LINEAR_PROBE",
           "PROBE_TASKS", "RETRIEVAL", "SPEC_KEYS", "TASKS", "EvalError", "EvalSet", "Sample", "Template",
           "decode_image", "iter_batches", "parse_spec", "open_eval_set", "open_train_split", "fill_templates"]



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
    if is_compositional(path, opts):
        return open_compositional_set(spec, path, opts)
    if path.is_file():
        if path.suffix.lower() not in CAPTION_FILE_EXTS:
            raise EvalError(f"{path}: a caption file must be .csv, .tsv, .jsonl or .json")
        es = EvalSet(spec, opts.get("name", path.stem), opts.get("task", RETRIEVAL), "captions", path, options=opts,
                     reader=read_caption_file)
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
    es = EvalSet(spec, opts.get("name", "wds/" + root.name), task, "wds", root, options=opts, reader=read_wds)
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
    empty = [c for c in classes if not any(p.suffix.lower() in IMAGE_FILE_SUFFIXES for p in (root / c).rglob("*"))]
    if empty:
        raise EvalError(f"{opts.get('name', root.name)}: class folder(s) {', '.join(empty[:5])} in {root} hold no "
                        "images: remove them, or add their images")
    es = EvalSet(spec, opts.get("name", root.name), task, "folder", root, options=opts, reader=read_folder)
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
    names = [str(n).strip() for n in _read_list(path, es.name)]
    if not names:
        raise EvalError(f"{es.name}: class name file {path} is empty")
    seen: set = set()
    dup = next((n for n in names if n in seen or seen.add(n)), None)
    if dup is not None:
        raise EvalError(f"{es.name}: class name '{dup}' appears twice in {path}: its two classes would share one "
                        "zero-shot classifier row; give each class its own name")
    return names


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
