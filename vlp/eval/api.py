"""`evaluate`: the one code path behind `eval_zeroshot.py`, the trainer's in-loop evaluation and the benchmark."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from vlp.eval import geometry as G
from vlp.eval import retrieval as R
from vlp.eval import zeroshot as Z
from vlp.eval.datasets import (CAPTION_SELECTION, CLASSIFICATION, KNN, LINEAR_PROBE, RETRIEVAL, EvalError, EvalSet,
                               open_eval_set, open_train_split)
from vlp.eval.encode import encode_images, encode_texts
from vlp.eval.report import make_result


@dataclass(frozen=True)
class Share:
    """This process's part of the encoding work: a contiguous block of every list of images or texts.
    Features are gathered in rank order, so every rank holds the whole set's features; metrics are computed
    on rank 0 only."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def range(self, n: int) -> tuple[int, int]:
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def encode(self, n: int, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Features of all `n` items in order: `fn(a, b)` encodes items a..b-1; this rank runs its block."""
        a, b = self.range(n)
        part, err = torch.empty(0, 0), None
        try:
            if b > a:
                part = fn(a, b)
        except Exception as e:  # noqa: BLE001 - agreed on by every rank, then raised on each
            err = e
        self.agree(err)
        return self.gather(part)

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return part
        from vlp.distributed import all_gather_rows

        return all_gather_rows(part)

    def agree(self, error: Optional[BaseException]) -> None:
        """Raise on every rank if encoding failed on any (so no rank waits in a gather the others skip)."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        msgs = [None] * self.world
        dist.all_gather_object(msgs, None if error is None else _one_line(error))
        bad = next(((r, m) for r, m in enumerate(msgs) if m is not None), None)
        if bad is not None:
            raise EvalError(bad[1] if bad[0] == self.rank else f"{bad[1]} (on rank {bad[0]})")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text and isinstance(e, EvalError) else f"{type(e).__name__}: {text[0] if text else ''}"


def evaluate(model, tokenizer: Callable, preprocess: Callable, eval_data: Sequence[Union[str, EvalSet]], *,
             device="cpu", batch_size: int = 256, model_name: str = "", pretrained: str = "",
             amp: Optional[bool] = None, num_workers: int = 0, recall_k: Sequence[int] = (1, 5, 10),
             geometry: bool = True, per_class: bool = False, classnames: Optional[str] = None,
             templates: Optional[str] = None, progress: bool = False, step: Optional[int] = None,
             cache_images: bool = True, ties: str = R.TIE_RULES[0], fewshot_k: int = -1, seed: int = 0,
             knn_k: Sequence[int] = (1, 10, 20), feature_cache: Union[str, None, bool] = None,
             distributed: bool = False, on_error: str = "raise") -> list[dict]:
    """Score `model` on every eval set; one CLIP_benchmark-schema dict per (dataset, task).

    `eval_data` entries are spec strings (see `vlp.eval.datasets`: a wds root, an image folder, a CSV/JSONL,
    each optionally `?name=..&classnames=..&templates=..&task=..`) or opened `EvalSet`s. `metrics` holds
    CLIP_benchmark's names plus `geometry/*` and the retrieval ranks. The model is put in eval mode for the
    call and its mode restored. `amp=None` means autocast on CUDA and fp32 elsewhere. Raises `EvalError`
    (one line) on bad input.

    `ties`: how retrieval and compositional sets count a negative that scores the same as the positive
    (`clip_benchmark`, the default: by `torch.topk`'s order / argmax, as CLIP_benchmark; `positive_wins`: within
    `retrieval.TIE_TOL`, in the positive's favour); every result records it as `vlp.ties`. Linear probe / k-NN: `fewshot_k` (per class, -1 = all; a spec's `fewshot_k=` wins), `seed`,
    `knn_k`, and `feature_cache` (folder for float16 features; None: `features.default_cache_dir()`;
    False: no disk cache).

    `distributed`: every rank of the default process group calls this with the same sets; each encodes its
    share of every set's images and texts (`Share`), the features are gathered, and rank 0 computes the
    metrics and returns the results (the other ranks return []). The disk feature cache is off then. A `Share`
    (a subclass) passed as `distributed` is used as this process's share.

    `on_error="record"`: a set that fails while being scored gives `{"dataset", "task", "error": one line}`
    (on rank 0) instead of raising, and the other sets are still scored (all ranks stay in step).
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', not {on_error!r}")
    if ties not in R.TIE_RULES:
        raise EvalError(f"ties must be one of {', '.join(R.TIE_RULES)}, not {ties!r}")
    sets = [s if isinstance(s, EvalSet) else open_eval_set(s, classnames, templates) for s in eval_data]
    share = Share()
    if distributed:
        from vlp.distributed import world_info

        share = distributed if isinstance(distributed, Share) else Share(*world_info())
        if share.world > 1:
            feature_cache = False
    was_training = model.training
    model.eval()
    if amp is None:
        amp = torch.device(device).type == "cuda"
    kw = dict(device=device, batch_size=batch_size, amp=amp, progress=progress and share.main,
              cache=cache_images, share=share, num_workers=num_workers)
    results = []
    try:
        for es in sets:
            t0 = time.perf_counter()
            kw["skip"] = {"n": 0, "local": []}
            try:
                if es.task == CLASSIFICATION:
                    metrics, extra = _classification(model, tokenizer, preprocess, es, geometry, per_class, kw)
                elif es.task == RETRIEVAL:
                    metrics, extra = _retrieval(model, tokenizer, preprocess, es, geometry, recall_k, kw, ties)
                elif es.task in (LINEAR_PROBE, KNN):
                    probe = dict(fewshot_k=fewshot_k, seed=seed, knn_k=knn_k, feature_cache=feature_cache)
                    metrics, extra = _probe(model, preprocess, es, probe, kw)
                elif es.task == CAPTION_SELECTION:
                    metrics, extra = _caption_selection(model, tokenizer, preprocess, es, kw, ties)
                else:  # pragma: no cover - open_eval_set validates the task
                    raise EvalError(f"{es.name}: unsupported task {es.task}")
            except Exception as e:  # noqa: BLE001 - in "record" mode any failure of one set is reported, not fatal
                if on_error == "raise":
                    raise
                if share.main:
                    results.append({"dataset": es.name, "task": es.task, "error": _one_line(e), "step": step})
                continue
            if metrics is None:          # not rank 0: features shared, nothing to report
                continue
            extra["seconds"] = round(time.perf_counter() - t0, 3)
            extra["ties"] = ties
            extra.update(_skip_report(kw["skip"]))
            if share.world > 1:
                extra["world_size"] = share.world
            if step is not None:
                extra["step"] = int(step)
            per = extra.pop("per_class", None)
            results.append(make_result(es.name, es.task, metrics, model=model_name, pretrained=pretrained,
                                       vlp=extra, per_class=per))
    finally:
        model.train(was_training)
    return results


def _skip_report(skip: dict) -> dict:
    """The result's record of images that could not be decoded and were left out (as training skips them)."""
    if not skip["n"]:
        return {}
    from collections import Counter

    out = {"skipped_images": skip["n"]}
    if skip["local"]:      # what this process saw (all of it unless the set was split across ranks)
        out["skipped"] = dict(Counter(reason for _, reason, _ in skip["local"]))
        out["skipped_first"] = skip["local"][0][2]
    return out


def _decoded(img: torch.Tensor, kw: dict) -> torch.Tensor:
    """Which rows of `img` hold features (a skipped image's row is NaN); counts the others in kw["skip"]."""
    keep = ~img.isnan().any(dim=1)
    kw["skip"]["n"] += int((~keep).sum())
    if not keep.any():
        raise EvalError("no image of the set could be decoded" +
                        (f" ({kw['skip']['local'][0][2]})" if kw["skip"]["local"] else ""))
    return keep


def _encode_kw(kw: dict) -> dict:
    return {k: kw[k] for k in ("device", "batch_size", "amp", "progress")}


def _images(model, preprocess, es: EvalSet, kw: dict, samples=None, cache: Optional[bool] = None) -> torch.Tensor:
    """Image features of `samples` (default: the set's) in order: this rank encodes its share, all gather."""
    share: Share = kw["share"]
    samples = es.samples() if samples is None else samples
    fp = es.fingerprint() if (kw["cache"] if cache is None else cache) else None
    return share.encode(len(samples), lambda a, b: encode_images(
        model, preprocess, samples[a:b], num_workers=kw["num_workers"], desc=f"{es.name} images",
        cache_key=None if fp is None else (fp, a, b, len(samples)), skipped=kw["skip"]["local"], **_encode_kw(kw)))


def _texts(model, tokenizer, texts: list[str], kw: dict, desc: str) -> torch.Tensor:
    share: Share = kw["share"]
    return share.encode(len(texts), lambda a, b: encode_texts(model, tokenizer, texts[a:b], desc=desc,
                                                              **_encode_kw(kw)))


def _classification(model, tokenizer, preprocess, es: EvalSet, geometry, per_class, kw):
    samples = es.samples()
    target = torch.tensor([int(s.target) for s in samples], dtype=torch.long)
    share: Share = kw["share"]
    # each rank builds the classifier rows of its share of the classes
    classifier = share.encode(len(es.classnames), lambda a, b: Z.build_classifier(
        model, tokenizer, es.classnames[a:b], es.templates, **_encode_kw(kw)))
    img = _images(model, preprocess, es, kw)
    if not share.main:
        return None, None
    keep = _decoded(img, kw)
    img, target, samples = img[keep], target[keep], [s for s, k in zip(samples, keep.tolist()) if k]
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


def _retrieval(model, tokenizer, preprocess, es: EvalSet, geometry, recall_k, kw, ties):
    samples = es.samples()
    if not any(s.target for s in samples):
        raise EvalError(f"{es.name}: no captions in the retrieval set")
    img = _images(model, preprocess, es, kw)
    keep = _decoded(img, kw)             # features are gathered: every rank keeps the same images
    img, samples = img[keep], [s for s, k in zip(samples, keep.tolist()) if k]
    texts = [c for s in samples for c in s.target]
    t2i = torch.tensor([i for i, s in enumerate(samples) for _ in s.target], dtype=torch.long)
    txt = _texts(model, tokenizer, texts, kw, f"{es.name} captions")
    if not kw["share"].main:
        return None, None
    metrics = R.retrieval_metrics(img, txt, t2i, recall_k=recall_k, device=kw["device"], ties=ties)
    if geometry:
        metrics.update(G.geometry_metrics(img[t2i], txt, img, txt))
    return metrics, {"n_images": len(samples), "n_texts": len(texts)}


def _split_features(model, preprocess, es: EvalSet, kw, cache_dir, model_id: list) -> tuple:
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
    x = _images(model, preprocess, es, kw).half()
    y = torch.tensor([int(s.target) for s in samples], dtype=torch.long)
    if key is not None:
        FC.save(cache_dir, key, x, y, {"dataset": es.name, "split": split, "n": len(samples)})
    return x.float(), y


def _probe(model, preprocess, es: EvalSet, probe: dict, kw):
    from vlp.eval import features as FC
    from vlp.eval.knn import knn_metrics
    from vlp.eval.probe import linear_probe

    cache = probe["feature_cache"]
    cache_dir = None if cache is False else (FC.default_cache_dir() if cache in (None, True) else cache)
    model_id: list = []
    train = open_train_split(es)
    tx, ty = _split_features(model, preprocess, train, kw, cache_dir, model_id)
    x, y = _split_features(model, preprocess, es, kw, cache_dir, model_id)
    if not kw["share"].main:
        return None, None
    keep_t, keep = _decoded(tx, kw), _decoded(x, kw)
    tx, ty, x, y = tx[keep_t], ty[keep_t], x[keep], y[keep]
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


def _caption_selection(model, tokenizer, preprocess, es: EvalSet, kw, ties):
    from vlp.eval.compositional import selection_metrics

    samples = es.samples()
    # SugarCrepe's subsets share COCO images: encode each image file once
    first: dict = {}
    which = torch.tensor([first.setdefault(s.path or s.key, len(first)) for s in samples])
    uniq = list({s.path or s.key: s for s in samples}.values())
    img = _images(model, preprocess, es, kw, samples=uniq, cache=False)
    keep_u = _decoded(img, kw)           # features are gathered: every rank keeps the same images
    keep = keep_u[which]
    img, samples = img[which][keep], [s for s, k in zip(samples, keep.tolist()) if k]
    texts = [c for s in samples for c in s.target]
    t2i = torch.tensor([i for i, s in enumerate(samples) for _ in s.target], dtype=torch.long)
    positive = torch.tensor([j == 0 for s in samples for j in range(len(s.target))])
    txt = _texts(model, tokenizer, texts, kw, f"{es.name} captions")
    if not kw["share"].main:
        return None, None
    metrics = selection_metrics(img, txt, t2i, positive, [s.key.split("/", 1)[0] for s in samples], ties)
    return metrics, {"n_items": len(samples), "n_images": int(keep_u.sum()), "n_texts": len(texts)}
