"""`evaluate`: the one code path behind `eval_zeroshot.py`, the trainer's in-loop evaluation and the benchmark."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import torch

from vlp.eval import geometry as G
from vlp.eval import retrieval as R
from vlp.eval import zeroshot as Z
from vlp.eval.datasets import (CAPTION_SELECTION, CLASSIFICATION, KNN, LINEAR_PROBE, RETRIEVAL, EvalError, EvalSet,
                               open_eval_set, open_train_split)
from vlp.eval.encode import encode_images, encode_texts
from vlp.eval.report import make_result


def evaluate(model, tokenizer: Callable, preprocess: Callable, eval_data: Sequence[Union[str, EvalSet]], *,
             device="cpu", batch_size: int = 256, model_name: str = "", pretrained: str = "",
             amp: Optional[bool] = None, num_workers: int = 0, recall_k: Sequence[int] = (1, 5, 10),
             geometry: bool = True, per_class: bool = False, classnames: Optional[str] = None,
             templates: Optional[str] = None, progress: bool = False, step: Optional[int] = None,
             cache_images: bool = True, ties: str = "vlp", fewshot_k: int = -1, seed: int = 0,
             knn_k: Sequence[int] = (1, 10, 20), feature_cache: Union[str, None, bool] = None) -> list[dict]:
    """Score `model` on every eval set; one CLIP_benchmark-schema dict per (dataset, task).

    `eval_data` entries are spec strings (see `vlp.eval.datasets`: a wds root, an image folder, a CSV/JSONL,
    each optionally `?name=..&classnames=..&templates=..&task=..`) or opened `EvalSet`s. `metrics` holds
    CLIP_benchmark's names plus `geometry/*` and the retrieval ranks. The model is put in eval mode for the
    call and its mode restored. `amp=None` means autocast on CUDA and fp32 elsewhere. Raises `EvalError`
    (one line) on bad input.

    `ties`: how retrieval ranks a negative that scores the same as the positive (`vlp`: within
    `retrieval.TIE_TOL`, in the positive's favour; `clip_benchmark`: by `torch.topk`'s order, figure for
    figure). Linear probe / k-NN: `fewshot_k` (per class, -1 = all; a spec's `fewshot_k=` wins), `seed`,
    `knn_k`, and `feature_cache` (folder for float16 features; None: `features.default_cache_dir()`;
    False: no disk cache).
    """
    if ties not in R.TIE_RULES:
        raise EvalError(f"ties must be one of {R.TIE_RULES}")
    sets = [s if isinstance(s, EvalSet) else open_eval_set(s, classnames, templates) for s in eval_data]
    was_training = model.training
    model.eval()
    if amp is None:
        amp = torch.device(device).type == "cuda"
    kw = dict(device=device, batch_size=batch_size, amp=amp, progress=progress)
    cache = {"cache": cache_images}
    results = []
    try:
        for es in sets:
            t0 = time.perf_counter()
            if es.task == CLASSIFICATION:
                metrics, extra = _classification(model, tokenizer, preprocess, es, num_workers, geometry, per_class,
                                                 {**kw, **cache})
            elif es.task == RETRIEVAL:
                metrics, extra = _retrieval(model, tokenizer, preprocess, es, num_workers, geometry, recall_k,
                                            {**kw, **cache}, ties)
            elif es.task in (LINEAR_PROBE, KNN):
                probe = dict(fewshot_k=fewshot_k, seed=seed, knn_k=knn_k, feature_cache=feature_cache)
                metrics, extra = _probe(model, preprocess, es, num_workers, probe, {**kw, **cache})
            elif es.task == CAPTION_SELECTION:
                metrics, extra = _caption_selection(model, tokenizer, preprocess, es, num_workers, {**kw, **cache})
            else:  # pragma: no cover - open_eval_set validates the task
                raise EvalError(f"{es.name}: unsupported task {es.task}")
            extra["seconds"] = round(time.perf_counter() - t0, 3)
            if step is not None:
                extra["step"] = int(step)
            per = extra.pop("per_class", None)
            results.append(make_result(es.name, es.task, metrics, model=model_name, pretrained=pretrained,
                                       vlp=extra, per_class=per))
    finally:
        model.train(was_training)
    return results


def _images(model, preprocess, es: EvalSet, num_workers: int, kw: dict) -> torch.Tensor:
    kw = dict(kw)
    key = es.fingerprint() if kw.pop("cache") else None
    return encode_images(model, preprocess, es.samples(), num_workers=num_workers, cache_key=key,
                         desc=f"{es.name} images", **kw)


def _text(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "cache"}


def _classification(model, tokenizer, preprocess, es: EvalSet, num_workers, geometry, per_class, kw):
    samples = es.samples()
    target = torch.tensor([int(s.target) for s in samples], dtype=torch.long)
    classifier = Z.build_classifier(model, tokenizer, es.classnames, es.templates, **_text(kw))
    img = _images(model, preprocess, es, num_workers, kw)
    logits = Z.logits(img, classifier)
    metrics = Z.classification_metrics(logits, target, len(es.classnames))
    if geometry:
        metrics.update(G.geometry_metrics(img, classifier[target], img, classifier))
    extra = {"n_images": len(samples), "n_classes": len(es.classnames),
             "n_prompts": sum(len(es.templates[c]) for c in es.classnames) if isinstance(es.templates, dict)
             else len(es.templates) * len(es.classnames)}
    if per_class:
        extra["per_class"] = Z.per_class_report(logits, target, es.classnames)
    return metrics, extra


def _retrieval(model, tokenizer, preprocess, es: EvalSet, num_workers, geometry, recall_k, kw, ties):
    samples = es.samples()
    texts = [c for s in samples for c in s.target]
    if not texts:
        raise EvalError(f"{es.name}: no captions in the retrieval set")
    t2i = torch.tensor([i for i, s in enumerate(samples) for _ in s.target], dtype=torch.long)
    img = _images(model, preprocess, es, num_workers, kw)
    txt = encode_texts(model, tokenizer, texts, desc=f"{es.name} captions", **_text(kw))
    metrics = R.retrieval_metrics(img, txt, t2i, recall_k=recall_k, device=kw["device"], ties=ties)
    if geometry:
        metrics.update(G.geometry_metrics(img[t2i], txt, img, txt))
    return metrics, {"n_images": len(samples), "n_texts": len(texts)}


def _split_features(model, preprocess, es: EvalSet, num_workers, kw, cache_dir, model_id: list) -> tuple:
    """(features [N, D] rounded to float16 as cached, targets [N]) of one split, from the disk cache if there."""
    from vlp.eval import features as FC

    split = es.options.get("split", "test") if es.kind == "wds" else str(es.root)
    key = None
    if cache_dir is not None:
        if not model_id:
            model_id.append(FC.model_fingerprint(model))
        key = FC.cache_key(model_id[0], es.data_fingerprint(), split, preprocess)
        hit = FC.load(cache_dir, key)
        if hit is not None:
            return hit
    samples = es.samples()
    x = _images(model, preprocess, es, num_workers, kw).half()
    y = torch.tensor([int(s.target) for s in samples], dtype=torch.long)
    if key is not None:
        FC.save(cache_dir, key, x, y, {"dataset": es.name, "split": split, "n": len(samples)})
    return x.float(), y


def _probe(model, preprocess, es: EvalSet, num_workers, probe: dict, kw):
    from vlp.eval import features as FC
    from vlp.eval.knn import knn_metrics
    from vlp.eval.probe import linear_probe

    cache = probe["feature_cache"]
    cache_dir = None if cache is False else (FC.default_cache_dir() if cache in (None, True) else cache)
    model_id: list = []
    train = open_train_split(es)
    tx, ty = _split_features(model, preprocess, train, num_workers, kw, cache_dir, model_id)
    x, y = _split_features(model, preprocess, es, num_workers, kw, cache_dir, model_id)
    n_classes = len(es.classnames)
    extra = {"n_images": len(y), "n_train": len(ty), "n_classes": n_classes}
    if es.task == KNN:
        return knn_metrics(tx, ty, x, y, n_classes, ks=probe["knn_k"], device=kw["device"]), extra
    try:
        k = int(es.options.get("fewshot_k", probe["fewshot_k"]))
        metrics, info = linear_probe(tx, ty, x, y, n_classes, fewshot_k=k, seed=probe["seed"], device=kw["device"])
    except ValueError as e:
        raise EvalError(f"{es.name}: {e}") from None
    extra.update(info)
    return metrics, extra


def _caption_selection(model, tokenizer, preprocess, es: EvalSet, num_workers, kw):
    from vlp.eval.compositional import selection_metrics

    samples = es.samples()
    texts = [c for s in samples for c in s.target]
    t2i = torch.tensor([i for i, s in enumerate(samples) for _ in s.target], dtype=torch.long)
    positive = torch.tensor([j == 0 for s in samples for j in range(len(s.target))])
    # SugarCrepe's subsets share COCO images: encode each image file once
    first: dict = {}
    which = torch.tensor([first.setdefault(s.path or s.key, len(first)) for s in samples])
    uniq = list({s.path or s.key: s for s in samples}.values())
    kw = _text(kw)
    img = encode_images(model, preprocess, uniq, num_workers=num_workers, desc=f"{es.name} images", **kw)[which]
    txt = encode_texts(model, tokenizer, texts, desc=f"{es.name} captions", **kw)
    metrics = selection_metrics(img, txt, t2i, positive, [s.key.split("/", 1)[0] for s in samples])
    return metrics, {"n_items": len(samples), "n_images": len(uniq), "n_texts": len(texts)}
