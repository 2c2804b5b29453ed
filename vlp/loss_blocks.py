"""Contrastive losses whose per-rank memory does not grow with the number of ranks.

Gathering every rank's features and scoring the local B rows against all N = W*B columns holds
B x N logits (and as many saved for the backward): per-rank memory linear in W. The two autograd
Functions here never hold more than a B x chunk block of logits, in the forward or the backward:
they save only their B x D / N x D inputs and recompute each block of logits in the backward.

* `chunked_lse(rows, cols, scale, bias, chunk, exclude=None)`: the row-wise log-sum-exp of
  `scale * rows @ cols.T + bias` over all N columns, accumulated chunk by chunk (optionally leaving
  out each row's positive column `exclude + i`, for DCL/InfoLOOB). The InfoNCE local loss of rank r
  is `lse - positive logit` in both directions; the positive logits and the label-smoothing mean
  cost only B x D and are left to autograd (vlp/losses.py).
* `siglip_ring(image, text, scale, bias, rank, world, chunk)`: rank r's SigLIP loss, its B images
  against every rank's texts. Text blocks travel round the ring (r sends to r+1, receives from
  r-1), the next one in flight while the current one is scored. In the backward the blocks go
  round again, each carrying the gradient every rank adds to it; after W hops a block's gradient is
  back with its owner. Gradients are exactly those of the gathered local loss.

Both compute in float32 (float64 inputs stay float64) with autocast off. Every rank must call
them, forward and backward, with the same shapes (the backward of `siglip_ring` communicates).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

from vlp.distributed import RingShift

TEXT_TAG, GRAD_TAG = 0, 1


@contextmanager
def _exact(t: torch.Tensor):
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


def _positives(c0: int, width: int, offset: int, n_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i whose positive column `offset + i` lies in the chunk [c0, c0+width), and that column's index in it."""
    lo, hi = max(0, c0 - offset), min(n_rows, c0 + width - offset)
    rows = torch.arange(lo, max(lo, hi), device=device)
    return rows, rows + (offset - c0)


def _block(rows, cols, scale, bias) -> torch.Tensor:
    """scale * rows @ cols.T + bias, in one fresh B x c buffer."""
    logits = rows @ cols.T
    logits.mul_(scale)
    if bias is not None:
        logits.add_(bias)
    return logits


def _scale_bias_grads(rows, p_cols, p, scale, bias, needs) -> tuple:
    """Gradients of sum(P * logits) w.r.t. scale and bias, given P and P @ cols (B x D, no B x c temporary)."""
    gs = (rows * p_cols).sum().reshape(scale.shape) if needs[0] else None
    gb = p.sum().reshape(bias.shape) if bias is not None and needs[1] else None
    return gs, gb


def _add(acc, x):
    return x if acc is None else (acc if x is None else acc + x)


class _ChunkedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, scale, bias, chunk: int, exclude: Optional[int]):
        with _exact(rows):
            lse = rows.new_full((rows.shape[0],), float("-inf"))
            for c0 in range(0, cols.shape[0], chunk):
                logits = _block(rows, cols[c0:c0 + chunk], scale, bias)
                if exclude is not None:
                    i, j = _positives(c0, logits.shape[1], exclude, rows.shape[0], rows.device)
                    logits[i, j] = float("-inf")
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                del logits  # before the next block is allocated: one B x chunk block alive at a time
        ctx.save_for_backward(rows, cols, scale, bias, lse)
        ctx.chunk, ctx.exclude = chunk, exclude
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        rows, cols, scale, bias, lse = ctx.saved_tensors
        need_rows, need_cols, need_s, need_b = ctx.needs_input_grad[:4]
        g_rows = torch.zeros_like(rows) if need_rows else None
        g_cols = torch.zeros_like(cols) if need_cols else None
        g_s = g_b = None
        with _exact(rows):
            for c0 in range(0, cols.shape[0], ctx.chunk):
                block = cols[c0:c0 + ctx.chunk]
                p = _block(rows, block, scale, bias)
                if ctx.exclude is not None:
                    i, j = _positives(c0, p.shape[1], ctx.exclude, rows.shape[0], rows.device)
                    p[i, j] = float("-inf")
                # d lse_i / d logit_ij = softmax_ij; times the incoming gradient of row i
                p.sub_(lse[:, None]).exp_().mul_(grad_lse[:, None])
                p_cols = p @ block
                if need_rows:
                    g_rows.add_(p_cols * scale)
                if need_cols:
                    g_cols[c0:c0 + ctx.chunk] = (p.T @ rows) * scale
                gs, gb = _scale_bias_grads(rows, p_cols, p, scale, bias, (need_s, need_b))
                g_s, g_b = _add(g_s, gs), _add(g_b, gb)
                del p
        return g_rows, g_cols, g_s, g_b, None, None


def chunked_lse(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                chunk: int, exclude: Optional[int] = None) -> torch.Tensor:
    """logsumexp_j (scale * rows_i . cols_j + bias) for every row i, never holding more than B x chunk logits.

    `exclude=k` leaves out column k + i of row i (the positive, for the decoupled losses)."""
    return _ChunkedLSE.apply(rows, cols, scale, bias, int(chunk), exclude)


def _siglip_signed(image, block, scale, bias, positives: bool, c0: int) -> torch.Tensor:
    """-z * logits for columns c0.. of a text block: z = +1 on the pairs (own block's diagonal), -1 elsewhere."""
    a = _block(image, block, scale, bias)
    if positives:
        i, j = _positives(c0, a.shape[1], 0, image.shape[0], image.device)
        a[i, j] = -a[i, j]
    return a


class _SigLipRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, rank: int, world: int, chunk: int):
        total = image.new_zeros(())
        block = text.detach()
        with _exact(image):
            for k in range(world):
                incoming = RingShift([block], rank, world, TEXT_TAG) if k < world - 1 else None
                for c0 in range(0, block.shape[0], chunk):
                    # -log sigmoid(z * logit) = softplus(-z * logit)
                    a = _siglip_signed(image, block[c0:c0 + chunk], scale, bias, k == 0, c0)
                    total += F.softplus(a).sum()
                    del a
                if incoming is not None:
                    block = incoming.wait()[0]
        ctx.save_for_backward(image, text, scale, bias)
        ctx.rank, ctx.world, ctx.chunk = rank, world, chunk
        return total / image.shape[0]

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias = ctx.saved_tensors
        rank, world, chunk = ctx.rank, ctx.world, ctx.chunk
        need_s, need_b = ctx.needs_input_grad[2:4]
        grad = grad / image.shape[0]
        g_image = torch.zeros_like(image)
        g_s = g_b = None
        block, g_block = text.detach(), torch.zeros_like(text)
        with _exact(image):
            for k in range(world):
                # the text block moves on now; its gradient follows once this rank has added its share
                incoming = RingShift([block], rank, world, TEXT_TAG) if k < world - 1 else None
                for c0 in range(0, block.shape[0], chunk):
                    cols = block[c0:c0 + chunk]
                    # d softplus(-z l)/d l = -z * sigmoid(-z l)
                    p = _siglip_signed(image, cols, scale, bias, k == 0, c0).sigmoid_()
                    if k == 0:
                        i, j = _positives(c0, p.shape[1], 0, image.shape[0], image.device)
                        p[i, j] = -p[i, j]
                    p.mul_(grad)
                    p_cols = p @ cols
                    g_image.add_(p_cols * scale)
                    g_block[c0:c0 + chunk].add_((p.T @ image) * scale)
                    gs, gb = _scale_bias_grads(image, p_cols, p, scale, bias, (need_s, need_b))
                    g_s, g_b = _add(g_s, gs), _add(g_b, gb)
                    del p
                # after the last hop (k = W-1) each block's gradient reaches the rank that owns it
                g_block = RingShift([g_block], rank, world, GRAD_TAG).wait()[0]
                if incoming is not None:
                    block = incoming.wait()[0]
        return g_image, g_block, g_s, g_b, None, None, None


def siglip_ring(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                rank: int = 0, world: int = 1, chunk: int = 4096) -> torch.Tensor:
    """Rank `rank`'s SigLIP loss: -sum_ij log sigmoid(z_ij (scale I_i.T_j + bias)) / B over its B images and
    all W*B texts (z = +1 on its own pairs), with text blocks passed round the ring instead of gathered."""
    return _SigLipRing.apply(image, text, scale, bias, rank, world, int(chunk))
