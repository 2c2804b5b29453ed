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

from vlp.eval.decode import iter_batches
from vlp.eval.evalset import EvalError, Sample
from vlp.progress import progress_bar

CACHE_BYTES = int(os.environ.get("VLP_EVAL_CACHE_MB", "1024")) * 2**20
_image_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
MIN_CHUNK_TOKENS = 512   # below this many tokens per call the matmuls themselves get inefficient


def _l2_bytes() -> int:
    """One core's L2 cache (Linux sysfs), 1 MiB when unknown."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index2/size").read().strip().upper()
        mult = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 2**20


def cpu_chunk_rows(device, seq_len: int, width: int) -> Optional[int]:
    """Rows per transformer call on CPU: few enough that one [rows, seq_len, width] float32 activation fits in
    half a core's L2 cache, yet at least MIN_CHUNK_TOKENS tokens. None (one call per batch) elsewhere.

    A CPU forward over a batch whose activations spill out of L2 runs from L3 or memory: on a 2-core EPYC
    (1 MiB L2 per core), vlp-tiny's image tower took 0.51-0.57 s for 512 images in calls of 256 and
    0.33 s in calls of 32; its text tower 0.33 s for 4000 prompts in calls of 256 and 0.23 s in calls of
    128; ViT-B-32 7.6 s for 128 images in one call and 6.5 s in calls of 8. Results are the same up to
    float rounding (each row is computed on its own)."""
    if torch.device(device).type != "cpu" or seq_len <= 0 or width <= 0:
        return None
    fit = (_l2_bytes() // 2) // (seq_len * width * 4)
    return max(1, fit, -(-MIN_CHUNK_TOKENS // seq_len))


def autocast(device, amp: bool):
    dev = torch.device(device).type
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(dev, dtype=torch.bfloat16 if dev == "cpu" else torch.float16)


def _text_width(model) -> int:
    return getattr(getattr(model, "transformer", None), "width", 0)


def _image_tokens(model) -> tuple[int, int]:
    """(tokens, width) of an open_clip ViT image tower's residual stream; (0, 0) for other towers."""
    v = getattr(model, "visual", None)
    grid, tf = getattr(v, "grid_size", None), getattr(v, "transformer", None)
    if grid is None or not hasattr(tf, "width"):
        return 0, 0
    return int(grid[0]) * int(grid[1]) + 1, int(tf.width)


def _is_exactly(obj, cls) -> bool:
    """`type(obj) is cls`, also for FSDP2's per-instance subclass of it (`FSDP<Name>`, which only adds hooks)."""
    t = type(obj)
    return t is cls or (t.__name__ == f"FSDP{cls.__name__}" and cls in t.__bases__)


def _pool_index(model, tok: torch.Tensor) -> Optional[torch.Tensor]:
    """Where the text tower reads its output for each row, when `model` is open_clip's built-in causal
    text transformer with argmax/eos pooling (else None: the length trick below would not be exact)."""
    import open_clip

    if not _is_exactly(model, open_clip.model.CLIP) or getattr(model, "attn_mask", None) is None:
        return None
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        return tok.argmax(dim=-1)
    eos = getattr(model, "text_eos_id", None)
    if pool == "eos" and eos is not None:
        return (tok == eos).int().argmax(dim=-1)
    return None


def _supports_prefix_sharing(model) -> bool:
    """open_clip's plain causal text blocks: batch-first self-attention with packed q/k/v projections."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(getattr(model, "transformer", None), "resblocks", [])
    return len(blocks) > 0 and all(
        _is_exactly(b, ResidualAttentionBlock) and not hasattr(b, "ln_1_kv") and b.attn.batch_first
        and not hasattr(b.attn.in_proj_weight, "full_tensor")  # a sharded (DTensor) weight: read outside forward()
        and b.attn._qkv_same_embed_dim and b.attn.bias_k is None and not b.attn.add_zero_attn for b in blocks)


def _project(model, x: torch.Tensor) -> torch.Tensor:
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


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
    return _project(model, x[torch.arange(x.shape[0], device=x.device), idx])


def _shared_prefix_len(tok: torch.Tensor, idx: torch.Tensor) -> int:
    """How many leading tokens every row shares, kept short of every row's pooled position."""
    same = (tok == tok[:1]).all(dim=0).int().cumprod(0)
    return min(int(same.sum()), int(idx.min()))


def _qkv(attn: torch.nn.MultiheadAttention, h: torch.Tensor):
    """nn.MultiheadAttention's packed input projection, split into heads: 3 x [B, heads, L, head_dim]."""
    B, L, D = h.shape
    H = attn.num_heads
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    return q, k, v


class _SharedPrefix:
    """The keys and values of a token prefix that several texts share (e.g. one template's "a photo of a"),
    computed once per layer. With a causal mask a prefix's states do not depend on what follows it, so each
    text then runs only its own suffix tokens, attending to the cached prefix: exact, not an approximation
    (the same attention nn.MultiheadAttention computes, on fewer rows)."""

    def __init__(self, model, prefix: torch.Tensor):
        self.model, self.P = model, prefix.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(prefix).to(cast) + model.positional_embedding[:self.P].to(cast)
        self.kv = []
        for blk in model.transformer.resblocks:
            x, k, v = self._block(blk, x, None, model.attn_mask[:self.P, :self.P])
            self.kv.append((k, v))

    @staticmethod
    def _block(blk, x, cached, mask):
        h = blk.ln_1(x)
        q, k, v = _qkv(blk.attn, h)
        if cached is not None:
            B = x.shape[0]
            k = torch.cat([cached[0].expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([cached[1].expand(B, -1, -1, -1), v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        a = blk.attn.out_proj(a.transpose(1, 2).reshape(x.shape))
        x = x + blk.ls_1(a)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x))), k, v

    def encode(self, tok: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Text features of rows `tok` (full token rows starting with the prefix), pooled at `idx`."""
        m, P = self.model, self.P
        end = int(idx.max()) + 1
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tok[:, P:end]).to(cast) + m.positional_embedding[P:end].to(cast)
        mask = m.attn_mask[P:end, :end]
        for blk, cached in zip(m.transformer.resblocks, self.kv):
            x, _, _ = self._block(blk, x, cached, mask)
        x = m.ln_final(x)
        return _project(m, x[torch.arange(x.shape[0], device=x.device), idx - P])


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: list[str], *, device="cpu", batch_size: int = 256,
                 amp: bool = False, progress: bool = False, desc: str = "texts", trim: bool = True,
                 groups: Optional[list[list[int]]] = None, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L2-normalised text embeddings [M, D] (float32, CPU) in the order of `texts`.

    With `trim` (default) and an open_clip CLIP text tower, texts are batched by token length and each batch
    runs only up to its longest text's end-of-text token (see `_encode_text_prefix`). `groups` (lists of
    row indices, e.g. one template's prompts for every class) lets rows that share a token prefix run it once
    (`_SharedPrefix`). `tokens`: `tokenizer(texts)` when the caller already has it."""
    if not texts:
        return torch.empty(0, 0)
    tok = tokenizer(texts) if tokens is None else tokens
    pool = _pool_index(model, tok) if trim else None
    if pool is None or not groups or not _supports_prefix_sharing(model):
        groups = [list(range(len(texts)))]
    out = None
    jobs = []
    for g in groups:
        rows = torch.as_tensor(g, dtype=torch.long)
        shared = _shared_prefix_len(tok[rows], pool[rows]) if pool is not None and len(groups) > 1 else 0
        with autocast(device, amp):
            prefix = _SharedPrefix(model, tok[rows[:1], :shared].to(device)) if shared >= 2 else None
        rows = rows[torch.argsort(pool[rows], stable=True)] if pool is not None else rows
        jobs += [(chunk, prefix) for chunk in _chunks(rows, pool, batch_size, device, _text_width(model))]
    for rows, prefix in progress_bar(jobs, desc=desc, disable=not progress, unit="batch", leave=False):
        t = tok[rows].to(device)
        with autocast(device, amp):
            if prefix is not None:
                feats = prefix.encode(t, pool[rows].to(device))
            elif pool is not None:
                feats = _encode_text_prefix(model, t)
            else:
                feats = model.encode_text(t)
        feats = F.normalize(feats.float(), dim=-1).cpu()
        if out is None:
            out = torch.empty(len(texts), feats.shape[1])
        out[rows] = feats
    return out


def _chunks(rows: torch.Tensor, pool: Optional[torch.Tensor], batch_size: int, device, width: int):
    """Consecutive slices of `rows` (sorted by pooled position when `pool` is given) of at most `batch_size`,
    and on CPU at most `cpu_chunk_rows` for the slice's longest text."""
    s = 0
    while s < len(rows):
        n = min(batch_size, len(rows) - s)
        while pool is not None:
            cap = cpu_chunk_rows(device, int(pool[rows[s + n - 1]]) + 1, width)
            if cap is None or cap >= n:
                break
            n = cap
        yield rows[s:s + n]
        s += n


def _embed_tensor_batches(model, batches, n: int, device, amp: bool) -> torch.Tensor:
    feats = None
    rows = cpu_chunk_rows(device, *_image_tokens(model))
    for idx, x in batches:
        x = x.to(device, non_blocking=True)
        with autocast(device, amp):
            f = torch.cat([model.encode_image(c) for c in x.split(rows or len(x))])
        f = F.normalize(f.float(), dim=-1).cpu()
        if feats is None:
            feats = torch.full((n, f.shape[1]), float("nan"))    # rows of skipped images stay NaN
        feats[idx] = f
    return feats


@torch.no_grad()
def encode_images(model, preprocess: Callable, samples: list[Sample], *, device="cpu", batch_size: int = 256,
                  amp: bool = False, num_workers: int = 0, progress: bool = False, cache_key=None,
                  desc: str = "images", skipped: Optional[list] = None) -> torch.Tensor:
    """Image embeddings [N, D] in sample order. With a `skipped` list, an image that cannot be decoded is
    recorded there (`iter_batches`) and its row is NaN; without one it raises `UndecodableImage`."""
    n = len(samples)
    key = (cache_key, repr(preprocess)) if cache_key is not None else None
    if key is not None and key in _image_cache:
        _image_cache.move_to_end(key)
        pixels = _image_cache[key]
        batches = ((torch.arange(s, min(s + batch_size, n)), pixels[s:s + batch_size]) for s in range(0, n, batch_size))
        total = (n + batch_size - 1) // batch_size
        bar = progress_bar(batches, total=total, desc=desc, disable=not progress, leave=False)
        return _embed_tensor_batches(model, bar, n, device, amp)
    skipped_here: list = []
    stream = iter_batches(samples, preprocess, batch_size, num_workers,
                          skipped=skipped_here if skipped is not None else None)
    keep: list[tuple[torch.Tensor, torch.Tensor]] = []
    budget = CACHE_BYTES if key is not None else 0

    def tee():
        nonlocal budget
        for idx, x in progress_bar(stream, total=(n + batch_size - 1) // batch_size, desc=desc,
                                   disable=not progress, leave=False):
            if budget > 0:
                budget -= x.numel() * x.element_size()
                keep.append((idx, x)) if budget > 0 else keep.clear()
            yield idx, x

    feats = _embed_tensor_batches(model, tee(), n, device, amp)
    if skipped is not None:
        skipped.extend(skipped_here)
    if feats is None:     # every image of this share skipped: NaN rows (the caller decides), if the width is known
        width = getattr(getattr(model, "visual", None), "output_dim", None)
        if not skipped_here or width is None:
            raise EvalError(f"{desc}: no image could be decoded" + (f" ({skipped_here[0][2]})" if skipped_here else ""))
        feats = torch.full((n, int(width)), float("nan"))
    if key is not None and budget > 0 and keep and not skipped_here:
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
