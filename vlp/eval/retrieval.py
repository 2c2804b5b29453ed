"""Image-text retrieval metrics in chunks: memory grows with the chunk size, never as N_texts x N_images.

For every query we need the rank of its (best) positive. Scores are computed block by block
(`text_chunk` texts x `image_chunk` images); each block updates a running count, per text and per
image, of the *negatives* that score above that query's positive. rank = 1 + that count, and R@k is
`rank <= k`. The count is the exact form of a running top-k: it keeps, per query, how many items beat the
positive, which also gives exact mean and median ranks.

Ties. `ties="clip_benchmark"` (the default) is CLIP_benchmark's rule: R@k asks whether a positive is among
`torch.topk` of the query's full score row, so an item that scores exactly the positive's score falls
wherever topk's order puts it (at chunk x N memory); published tables are computed this way, so the
default figures are comparable with them. `ties="positive_wins"` counts a negative against the positive
only if it scores more than `TIE_TOL` (1e-6) above it: anything closer is a tie and counts in the
positive's favour. There the positive's own score is taken from the very block product that scores the
negatives (a first pass over the blocks that hold positives), so a bit-identical duplicate of the positive
scores exactly the same and ties; the tolerance covers near-duplicates whose features differ in the last
bits. Mean and median ranks always follow `positive_wins` (topk gives no rank beyond k). On a set with
duplicate captions (the demo's retrieval set: 1,200 captions, 801 distinct) the two rules differ by
points, so a result JSON records its rule (`vlp.ties`).

Names follow CLIP_benchmark: `image_retrieval_*` is text->image (a caption retrieves its image),
`text_retrieval_*` is image->text (an image retrieves any one of its captions).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

TIE_TOL = 1e-6
TIE_RULES = ("clip_benchmark", "positive_wins")   # the first is the default


def _ranges(n: int, chunk: int):
    return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]


@torch.no_grad()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, *,
                    text_chunk: int = 1024, image_chunk: int = 4096, device="cpu", tie_tol: float = TIE_TOL
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each text's image among all images [M], rank of each image's best caption among all texts [N]).

    Ranks start at 1; ties within `tie_tol` count in the positive's favour. An image without captions gets
    rank M + 1 (never retrieved)."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    t2i = text_to_image.long()
    dev = torch.device(device)
    img_d = image_emb.float().to(dev)
    txt = text_emb.float()
    t_blocks, i_blocks = _ranges(m, text_chunk), _ranges(n, image_chunk)
    # Pass 1: each text's score with its own image, from the same block products pass 2 computes.
    pos_t = torch.empty(m)
    for t0, t1 in t_blocks:
        tx, own = txt[t0:t1].to(dev), t2i[t0:t1].to(dev)
        for i0, i1 in i_blocks:
            inside = ((own >= i0) & (own < i1)).nonzero().squeeze(1)
            if inside.numel():
                s = tx @ img_d[i0:i1].T
                pos_t[t0 + inside.cpu()] = s[inside, own[inside] - i0].cpu()
    best_i = torch.full((n,), float("-inf")).scatter_reduce(0, t2i, pos_t, reduce="amax", include_self=True)
    above_t = torch.zeros(m, dtype=torch.long)    # images scoring above each text's image
    above_i = torch.zeros(n, dtype=torch.long)    # texts scoring above each image's best caption
    thr_i = (best_i + tie_tol).to(dev)
    # Pass 2: count what beats each positive by more than the tolerance. A query's own positives never do
    # (they score exactly what pass 1 recorded), so nothing needs to be taken back.
    for t0, t1 in t_blocks:
        tx = txt[t0:t1].to(dev)
        thr_t = (pos_t[t0:t1] + tie_tol).to(dev)
        acc_t = torch.zeros(t1 - t0, dtype=torch.long, device=dev)
        for i0, i1 in i_blocks:
            s = tx @ img_d[i0:i1].T                                            # [texts, images] block
            acc_t += (s > thr_t[:, None]).sum(dim=1)
            above_i[i0:i1] += (s > thr_i[None, i0:i1]).sum(dim=0).cpu()
        above_t[t0:t1] = acc_t.cpu()
    return above_t + 1, above_i + 1


@torch.no_grad()
def topk_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int], *,
              device="cpu", max_block: int = 2**24) -> dict[str, torch.Tensor]:
    """CLIP_benchmark's rule: for each query, is a positive among `torch.topk` of its score row (texts @
    images.T, as it computes them)? {metric name: hits}. Rows are processed `max_block // N` at a time."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    t2i = text_to_image.long()
    dev = torch.device(device)
    img, txt = image_emb.float().to(dev), text_emb.float().to(dev)
    # one topk per k, as CLIP_benchmark: the order of tied items can differ between topk(5) and topk(10)[:5]
    hit_t = {k: torch.zeros(m, dtype=torch.bool) for k in ks}
    for t0, t1 in _ranges(m, max(1, max_block // max(n, 1))):
        s = txt[t0:t1] @ img.T
        for k in ks:
            top = s.topk(min(k, n), dim=1)[1].cpu()
            hit_t[k][t0:t1] = (top == t2i[t0:t1, None]).any(dim=1)
    hit_i = {k: torch.zeros(n, dtype=torch.bool) for k in ks}
    for i0, i1 in _ranges(n, max(1, max_block // max(m, 1))):
        s = (txt @ img[i0:i1].T).T                                  # rows of the transposed score matrix
        for k in ks:
            top = s.topk(min(k, m), dim=1)[1].cpu()
            hit_i[k][i0:i1] = (t2i[top] == torch.arange(i0, i1)[:, None]).any(dim=1)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = hit_t[k]
        out[f"text_retrieval_recall@{k}"] = hit_i[k]
    return out


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      recall_k: Sequence[int] = (1, 5, 10), ties: str = TIE_RULES[0], **chunks) -> dict[str, float]:
    """R@k both ways under CLIP_benchmark's names, plus mean and median rank of the first correct item.
    `ties`: "clip_benchmark" (R@k by topk order, as CLIP_benchmark) or "positive_wins" (see the module)."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, not {ties!r}")
    rank_t, rank_i = retrieval_ranks(image_emb, text_emb, text_to_image, **chunks)
    out: dict[str, float] = {}
    hits = topk_hits(image_emb, text_emb, text_to_image, recall_k, device=chunks.get("device", "cpu")) \
        if ties == "clip_benchmark" else None
    for k in recall_k:
        for name, rank in (("image_retrieval", rank_t), ("text_retrieval", rank_i)):
            key = f"{name}_recall@{k}"
            out[key] = (hits[key] if hits is not None else rank <= k).float().mean().item()
    out["image_retrieval_mean_rank"] = float(rank_t.double().mean())
    out["image_retrieval_median_rank"] = float(np.median(rank_t.numpy()))
    out["text_retrieval_mean_rank"] = float(rank_i.double().mean())
    out["text_retrieval_median_rank"] = float(np.median(rank_i.numpy()))
    return out
