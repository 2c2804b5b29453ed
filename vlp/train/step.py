"""One optimiser step's forward and backward, exact under gradient accumulation.

A contrastive loss couples every sample of the batch to every other, so summing the losses
of micro-batches is not the loss of the batch. With `k` micro-batches we first encode all of
them without gradients (a feature cache), then re-encode each with gradients and splice its
features into the cached batch before computing the full-batch loss. The gradient reaching
micro-batch j's features is then exactly the full-batch gradient for them, at the cost of
one extra forward. `logit_scale`/`logit_bias` do not depend on the data: they receive their
gradient from one micro-step only (the last), otherwise it would be counted k times.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

LossFn = Callable[..., dict]


def _loss(loss_fn: LossFn, out: dict, image_features, text_features, keep_scale_grad: bool) -> dict:
    scale = out["logit_scale"]
    bias = out.get("logit_bias")
    if not keep_scale_grad:
        scale = scale.detach()
        bias = bias.detach() if bias is not None else None
    return loss_fn(image_features, text_features, scale, bias)


def train_step(
    model: torch.nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    autocast: Callable = nullcontext,
    no_sync: Callable = nullcontext,
) -> dict[str, torch.Tensor]:
    """Forward + backward for one optimiser step; returns the detached loss terms of the full batch."""
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with autocast():
            out = model(images, texts)
            losses = _loss(loss_fn, out, out["image_features"], out["text_features"], True)
        backward(losses["loss"])
        return {k: v.detach() for k, v in losses.items()}

    with torch.no_grad(), autocast():
        cached = [model(images, texts) for images, texts in micro_batches]
    image_cache = [c["image_features"] for c in cached]
    text_cache = [c["text_features"] for c in cached]
    last = len(micro_batches) - 1
    for j, (images, texts) in enumerate(micro_batches):
        with no_sync() if j < last else nullcontext():
            with autocast():
                out = model(images, texts)
                image_features = torch.cat(image_cache[:j] + [out["image_features"]] + image_cache[j + 1:])
                text_features = torch.cat(text_cache[:j] + [out["text_features"]] + text_cache[j + 1:])
                losses = _loss(loss_fn, out, image_features, text_features, keep_scale_grad=j == last)
            backward(losses["loss"])
    return {k: v.detach() for k, v in losses.items()}
