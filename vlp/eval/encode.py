"""Embed texts and images in batches (L2-normalised float32 on CPU), with an optional cache of decoded images.

Decoded, preprocessed images are kept in a small in-process LRU cache (keyed by the set's files and the
transform), so the trainer's periodic evaluation and a run folder's many checkpoints decode each set once.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlp.eval.datasets import Sample, iter_batches

CACHE_BYTES = int(os.environ.get("VLP_EVAL_CACHE_MB", "1024")) * 2**20
_image_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def autocast(device, amp: bool):
    dev = torch.device(device).type
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(dev, dtype=torch.bfloat16 if dev == "cpu" else torch.float16)


def _pool_index(model, tok: torch.Tensor) -> Optional[torch.Tensor]:
    """Where the text tower reads its output for each row, when `model` is open_clip's built-in causal
    text transformer with argmax/eos pooling (else None: the length trick below would not be exact)."""
    import open_clip

    if type(model) is not open_clip.model.CLIP or getattr(model, "attn_mask", None) is None:
        return None
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        return tok.argmax(dim=-1)
    eos = getattr(model, "text_eos_id", None)
    if pool == "eos" and eos is not None:
        return (tok == eos).int().argmax(dim=-1)
    return None


def _encode_text_prefix(model, tok: torch.Tensor) -> torch.Tensor:
    """open_clip `CLIP.encode_text` run on the first L tokens only, L = last pooled position + 1.

    With a causal mask no position attends to later ones, so the padding after the pooled token cannot
    change the output: the result equals `encode_text(tok)` up to float rounding, at a fraction of the cost."""
    idx = _pool_index(model, tok)
    n = int(idx.max()) + 1
    t = tok[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), idx]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: list[str], *, device="cpu", batch_size: int = 256,
                 amp: bool = False, progress: bool = False, desc: str = "texts", trim: bool = True) -> torch.Tensor:
    """L2-normalised text embeddings [M, D] (float32, CPU) in the order of `texts`.

    With `trim` (default) and an open_clip CLIP text tower, texts are batched by token length and each batch
    runs only up to its longest text's end-of-text token (see `_encode_text_prefix`)."""
    if not texts:
        return torch.empty(0, 0)
    tok = tokenizer(texts)
    pool = _pool_index(model, tok) if trim else None
    order = torch.argsort(pool, stable=True) if pool is not None else torch.arange(len(texts))
    out = None
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        rows = order[s:s + batch_size]
        t = tok[rows].to(device)
        with autocast(device, amp):
            feats = _encode_text_prefix(model, t) if pool is not None else model.encode_text(t)
        feats = F.normalize(feats.float(), dim=-1).cpu()
        if out is None:
            out = torch.empty(len(texts), feats.shape[1])
        out[rows] = feats
    return out


def _embed_tensor_batches(model, batches, n: int, device, amp: bool) -> torch.Tensor:
    feats = None
    for idx, x in batches:
        with autocast(device, amp):
            f = model.encode_image(x.to(device, non_blocking=True))
        f = F.normalize(f.float(), dim=-1).cpu()
        if feats is None:
            feats = torch.empty(n, f.shape[1])
        feats[idx] = f
    return feats


@torch.no_grad()
def encode_images(model, preprocess: Callable, samples: list[Sample], *, device="cpu", batch_size: int = 256,
                  amp: bool = False, num_workers: int = 0, progress: bool = False, cache_key=None,
                  desc: str = "images") -> torch.Tensor:
    """Image embeddings [N, D] in sample order."""
    n = len(samples)
    key = (cache_key, repr(preprocess)) if cache_key is not None else None
    if key is not None and key in _image_cache:
        _image_cache.move_to_end(key)
        pixels = _image_cache[key]
        batches = ((torch.arange(s, min(s + batch_size, n)), pixels[s:s + batch_size]) for s in range(0, n, batch_size))
        total = (n + batch_size - 1) // batch_size
        return _embed_tensor_batches(model, tqdm(batches, total=total, desc=desc, disable=not progress, leave=False),
                                     n, device, amp)
    stream = iter_batches(samples, preprocess, batch_size, num_workers)
    keep: list[tuple[torch.Tensor, torch.Tensor]] = []
    budget = CACHE_BYTES if key is not None else 0

    def tee():
        nonlocal budget
        for idx, x in tqdm(stream, total=(n + batch_size - 1) // batch_size, desc=desc, disable=not progress,
                           leave=False):
            if budget > 0:
                budget -= x.numel() * x.element_size()
                keep.append((idx, x)) if budget > 0 else keep.clear()
            yield idx, x

    feats = _embed_tensor_batches(model, tee(), n, device, amp)
    if key is not None and budget > 0 and keep:
        pixels = torch.empty((n, *keep[0][1].shape[1:]), dtype=keep[0][1].dtype)
        for idx, x in keep:
            pixels[idx] = x
        _remember(key, pixels)
    return feats


def _remember(key, pixels: torch.Tensor) -> None:
    _image_cache[key] = pixels
    while sum(t.numel() * t.element_size() for t in _image_cache.values()) > CACHE_BYTES and len(_image_cache) > 1:
        _image_cache.popitem(last=False)


def clear_cache() -> None:
    _image_cache.clear()
