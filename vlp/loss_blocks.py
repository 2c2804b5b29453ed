"""Contrastive losses whose per-rank memory does not grow with the number of ranks.

Gathering every rank's features and scoring the local B rows against all N = W*B columns holds
B x N logits (and as many saved for the backward): per-rank memory linear in W. Here no rank
gathers anything. Each rank's feature blocks travel round a ring (rank r sends to r+1, receives
from r-1; the next block in flight while the current one is scored), and every block is scored
B x chunk logits at a time. The autograd Functions save only their B x D inputs and recompute the
logits in the backward, where the blocks go round again, each carrying the gradient every rank
adds to it: after W hops a block's gradient is back with its owner. Gradients are exactly those of
the gathered local loss with `--gather-with-grad` (tests/test_distributed.py).

* `siglip_ring(image, text, scale, bias, rank, world, chunk)`: rank r's SigLIP loss, its B images
  against every rank's texts (open_clip's neighbour exchange, without holding received blocks).
* `lse_ring(image, text, scale, bias, rank, world, chunk, exclude_positive)`: for rank r's B rows,
  the log-sum-exp over all N columns in both directions (image rows against all texts, text rows
  against all images), accumulated block by block and chunk by chunk (a streaming log-sum-exp);
  `exclude_positive` leaves out each row's own pair (DCL/InfoLOOB). InfoNCE is `lse - positive`,
  the positive logits costing only B x D (vlp/losses.py).

Both compute in float32 (float64 inputs stay float64) with autocast off. Every rank must call
them, forward and backward, with the same shapes (both directions communicate).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vlp.distributed import RingShift

BLOCK_TAG, GRAD_TAG = 0, 1


@contextmanager
def _exact(t: torch.Tensor):
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


def _diagonal(c0: int, width: int, n_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i of the own block whose pair (column i) lies in the chunk [c0, c0+width), and its index in the chunk."""
    rows = torch.arange(c0, min(n_rows, c0 + width), device=device)
    return rows, rows - c0


def _logits(rows, cols, scale, bias) -> torch.Tensor:
    """scale * rows @ cols.T + bias, in one fresh B x c buffer."""
    logits = rows @ cols.T
    logits.mul_(scale)
    if bias is not None:
        logits.add_(bias)
    return logits


def _chunks(n: int, chunk: int):
    return ((c0, slice(c0, c0 + chunk)) for c0 in range(0, n, chunk))


def _ring(blocks: list[torch.Tensor], rank: int, world: int, visit: Callable[[int, list], None]) -> None:
    """Call `visit(k, blocks_of_rank_r_minus_k)` for k = 0..W-1, the next blocks in flight meanwhile."""
    for k in range(world):
        incoming = RingShift(blocks, rank, world, BLOCK_TAG) if k < world - 1 else None
        visit(k, blocks)
        if incoming is not None:
            blocks = incoming.wait()


def _ring_grads(blocks: list[torch.Tensor], rank: int, world: int,
                visit: Callable[[int, list, list], None]) -> list[torch.Tensor]:
    """Like `_ring`, with a gradient buffer travelling behind each block: `visit(k, blocks, grads)` adds
    this rank's share to `grads`; returns the gradients of this rank's own blocks, summed over all ranks."""
    grads = [torch.zeros_like(b) for b in blocks]
    for k in range(world):
        incoming = RingShift(blocks, rank, world, BLOCK_TAG) if k < world - 1 else None
        visit(k, blocks, grads)
        # after the last hop (k = W-1) each gradient reaches the rank that owns its block
        grads = RingShift(grads, rank, world, GRAD_TAG).wait()
        if incoming is not None:
            blocks = incoming.wait()
    return grads


class _Grads:
    """Accumulates the gradients of scale and bias (None where not needed)."""

    def __init__(self, scale, bias, needs):
        self.s = torch.zeros_like(scale) if needs[0] else None
        self.b = torch.zeros_like(bias) if bias is not None and needs[1] else None

    def add(self, rows, p_cols, p):
        """For d(sum P * logits): scale's share is sum(rows * (P @ cols)), no B x c temporary; bias's sum(P)."""
        if self.s is not None:
            self.s += (rows * p_cols).sum().reshape(self.s.shape)
        if self.b is not None:
            self.b += p.sum().reshape(self.b.shape)


def _backprop_block(p, rows, cols, scale, g_rows, g_cols, grads: _Grads) -> None:
    """Given P = d loss / d logits of rows x cols: add to the rows', cols', scale's and bias's gradients."""
    p_cols = p @ cols
    g_rows.add_(p_cols * scale)
    g_cols.add_((p.T @ rows) * scale)
    grads.add(rows, p_cols, p)


# ----------------------------------------------------------------------------- SigLIP

def _siglip_signed(image, cols, scale, bias, own: bool, c0: int) -> torch.Tensor:
    """-z * logits for columns c0.. of a text block: z = +1 on the pairs (own block's diagonal), -1 elsewhere."""
    a = _logits(image, cols, scale, bias)
    if own:
        i, j = _diagonal(c0, a.shape[1], image.shape[0], image.device)
        a[i, j] = -a[i, j]
    return a


class _SigLipRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, rank: int, world: int, chunk: int):
        total = image.new_zeros(())

        def visit(k, blocks):
            nonlocal total
            for c0, cs in _chunks(blocks[0].shape[0], chunk):
                a = _siglip_signed(image, blocks[0][cs], scale, bias, k == 0, c0)
                total += F.softplus(a).sum()  # -log sigmoid(z * logit) = softplus(-z * logit)
                del a  # one B x chunk block alive at a time

        with _exact(image):
            _ring([text.detach()], rank, world, visit)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.rank, ctx.world, ctx.chunk = rank, world, chunk
        return total / image.shape[0]

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias = ctx.saved_tensors
        grad = grad / image.shape[0]
        g_image = torch.zeros_like(image)
        sb = _Grads(scale, bias, ctx.needs_input_grad[2:4])

        def visit(k, blocks, grads):
            for c0, cs in _chunks(blocks[0].shape[0], ctx.chunk):
                # d softplus(-z l) / d l = -z * sigmoid(-z l)
                p = _siglip_signed(image, blocks[0][cs], scale, bias, k == 0, c0).sigmoid_()
                if k == 0:
                    i, j = _diagonal(c0, p.shape[1], image.shape[0], image.device)
                    p[i, j] = -p[i, j]
                p.mul_(grad)
                _backprop_block(p, image, blocks[0][cs], scale, g_image, grads[0][cs], sb)
                del p

        with _exact(image):
            (g_text,) = _ring_grads([text.detach()], ctx.rank, ctx.world, visit)
        return g_image, g_text, sb.s, sb.b, None, None, None


def siglip_ring(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                rank: int = 0, world: int = 1, chunk: int = 4096) -> torch.Tensor:
    """Rank `rank`'s SigLIP loss: -sum_ij log sigmoid(z_ij (scale I_i.T_j + bias)) / B over its B images and
    all W*B texts (z = +1 on its own pairs), with text blocks passed round the ring instead of gathered."""
    return _SigLipRing.apply(image, text, scale, bias, rank, world, int(chunk))


# ----------------------------------------------------------------------------- log-sum-exp (InfoNCE)

def _lse_logits(rows, cols, scale, bias, own: bool, exclude: bool, c0: int) -> torch.Tensor:
    logits = _logits(rows, cols, scale, bias)
    if own and exclude:
        i, j = _diagonal(c0, logits.shape[1], rows.shape[0], rows.device)
        logits[i, j] = float("-inf")
    return logits


class _LseRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, rank: int, world: int, chunk: int, exclude: bool):
        lse_i = image.new_full((image.shape[0],), float("-inf"))
        lse_t = text.new_full((text.shape[0],), float("-inf"))

        def visit(k, blocks):
            nonlocal lse_i, lse_t
            other_image, other_text = blocks
            for c0, cs in _chunks(other_text.shape[0], chunk):
                logits = _lse_logits(image, other_text[cs], scale, bias, k == 0, exclude, c0)
                lse_i = torch.logaddexp(lse_i, torch.logsumexp(logits, dim=1))
                del logits
                logits = _lse_logits(text, other_image[cs], scale, bias, k == 0, exclude, c0)
                lse_t = torch.logaddexp(lse_t, torch.logsumexp(logits, dim=1))
                del logits

        with _exact(image):
            _ring([image.detach(), text.detach()], rank, world, visit)
        ctx.save_for_backward(image, text, scale, bias, lse_i, lse_t)
        ctx.rank, ctx.world, ctx.chunk, ctx.exclude = rank, world, chunk, exclude
        return lse_i, lse_t

    @staticmethod
    def backward(ctx, g_lse_i, g_lse_t):
        image, text, scale, bias, lse_i, lse_t = ctx.saved_tensors
        g_image, g_text = torch.zeros_like(image), torch.zeros_like(text)
        sb = _Grads(scale, bias, ctx.needs_input_grad[2:4])
        directions = []  # (rows, their gradient, their lse, incoming gradient, which block is the columns)
        if g_lse_i is not None:
            directions.append((image, g_image, lse_i, g_lse_i, 1))
        if g_lse_t is not None:
            directions.append((text, g_text, lse_t, g_lse_t, 0))

        def visit(k, blocks, grads):
            for rows, g_rows, lse, g_lse, col in directions:
                for c0, cs in _chunks(blocks[col].shape[0], ctx.chunk):
                    # d lse_i / d logit_ij = softmax_ij, times row i's incoming gradient
                    p = _lse_logits(rows, blocks[col][cs], scale, bias, k == 0, ctx.exclude, c0)
                    p.sub_(lse[:, None]).exp_().mul_(g_lse[:, None])
                    _backprop_block(p, rows, blocks[col][cs], scale, g_rows, grads[col][cs], sb)
                    del p

        with _exact(image):
            g_other_image, g_other_text = _ring_grads([image.detach(), text.detach()], ctx.rank, ctx.world, visit)
        return g_image + g_other_image, g_text + g_other_text, sb.s, sb.b, None, None, None, None


def lse_ring(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
             rank: int = 0, world: int = 1, chunk: int = 4096, exclude_positive: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse_i, lse_t) for rank `rank`'s B pairs: logsumexp over all W*B texts of scale * I_i.T_j + bias, and over
    all W*B images of scale * T_i.I_j + bias, never holding more than B x chunk logits or any other rank's
    features beyond the block in flight. `exclude_positive`: leave out each row's own pair."""
    return _LseRing.apply(image, text, scale, bias, rank, world, int(chunk), bool(exclude_positive))
