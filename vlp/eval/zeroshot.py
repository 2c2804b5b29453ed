"""Zero-shot classification: a template-ensemble classifier built in large batches, and CLIP_benchmark's metrics.

The classifier is CLIP_benchmark's (and open_clip's): for each class, encode every filled template,
L2-normalise each, average, re-normalise. vlp encodes the prompts of *all* classes in batches of
`batch_size` instead of one class at a time; the arithmetic per class is the same.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vlp.eval.datasets import fill_templates
from vlp.eval.encode import encode_texts
from vlp.eval.prompt_tokens import tokenize_prompts

LOGIT_SCALE = 100.0   # CLIP_benchmark's fixed scale for zero-shot logits (order-preserving; kept for parity)


@torch.no_grad()
def build_classifier(model, tokenizer: Callable, classnames: list[str], templates, *, device="cpu",
                     batch_size: int = 256, amp: bool = False, progress: bool = False) -> torch.Tensor:
    """Class embeddings W [C, D] (float32, unit norm, on CPU)."""
    prompts, counts = fill_templates(classnames, templates)
    # One template's prompts (every class) share its leading words: encode them as a group.
    T = counts[0]
    groups = [list(range(j, len(prompts), T)) for j in range(T)] if len(set(counts)) == 1 else None
    emb = encode_texts(model, tokenizer, prompts, device=device, batch_size=batch_size, amp=amp,
                       progress=progress, desc="class prompts", groups=groups,
                       tokens=tokenize_prompts(tokenizer, prompts, classnames, templates))
    emb = F.normalize(emb, dim=-1)
    if len(set(counts)) == 1:
        w = emb.view(len(classnames), counts[0], -1).mean(dim=1)
    else:
        w = torch.stack([chunk.mean(dim=0) for chunk in torch.split(emb, counts)])
    return w / w.norm(dim=-1, keepdim=True)


def logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * image_features @ classifier.T


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Fraction of samples whose class is among the k highest logits (CLIP_benchmark's `accuracy`)."""
    pred = logits.topk(max(ks), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [int(correct[:k].sum().item()) / n for k in ks]


def mean_per_class_recall(target: np.ndarray, pred: np.ndarray) -> float:
    """Balanced accuracy, computed as sklearn's `balanced_accuracy_score` does (classes absent from the
    targets are left out of the mean), so the float is the same."""
    target = np.asarray(target)
    pred = np.asarray(pred)
    labels = np.union1d(target, pred)
    idx_t = np.searchsorted(labels, target)
    support = np.bincount(idx_t, minlength=len(labels))
    hits = np.bincount(idx_t[target == pred], minlength=len(labels))
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = hits[present] / support[present]
    return float(np.mean(per_class))


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> dict[str, float]:
    """`acc1`, `acc5` (NaN with fewer than 5 classes, as CLIP_benchmark), `mean_per_class_recall`."""
    if n_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, target, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, target, (1,)), float("nan")
    pred = logits.argmax(dim=1)
    return {"acc1": acc1, "acc5": acc5,
            "mean_per_class_recall": mean_per_class_recall(target.numpy(), pred.numpy())}


def per_class_report(logits: torch.Tensor, target: torch.Tensor, classnames: list[str],
                     top_confusions: int = 20) -> dict:
    """Per-class top-1 accuracy and the most frequent (true -> predicted) confusions."""
    c = len(classnames)
    pred = logits.argmax(dim=1)
    cm = torch.bincount(target * c + pred, minlength=c * c).view(c, c)
    support = cm.sum(dim=1)
    acc = {classnames[i]: (cm[i, i].item() / support[i].item()) if support[i] > 0 else None for i in range(c)}
    off = cm.clone()
    off.fill_diagonal_(0)
    vals, flat = off.flatten().topk(min(top_confusions, c * c))
    confusions = [{"true": classnames[int(f) // c], "predicted": classnames[int(f) % c], "count": int(v),
                   "fraction_of_true": int(v) / max(1, int(support[int(f) // c]))}
                  for v, f in zip(vals.tolist(), flat.tolist()) if v > 0]
    worst = sorted((a, n) for n, a in acc.items() if a is not None)[:10]
    return {"accuracy": acc, "support": {classnames[i]: int(support[i]) for i in range(c)},
            "top_confusions": confusions, "worst_classes": [n for _, n in worst]}
