"""Image-text retrieval metrics in chunks: memory grows with the chunk size, never as N_texts x N_images.

For every query we need the rank of its (best) positive. Scores are computed block by block
(`text_chunk` texts x `image_chunk` images); each block updates a running count, per text and per
image, of the *negatives* that score strictly above that query's positive. rank = 1 + that count,
and R@k is `rank <= k` -- the same figure as "a positive is among the top k" that CLIP_benchmark computes
with a full score matrix and `topk` (they can differ only when a negative ties the positive exactly,
which CLIP_benchmark resolves arbitrarily and vlp resolves in the positive's favour). The count is
the exact form of a running top-k: it keeps, per query, how many items beat the positive, which also
gives exact mean and median ranks.

Names follow CLIP_benchmark: `image_retrieval_*` is text->image (a caption retrieves its image),
`text_retrieval_*` is image->text (an image retrieves any one of its captions).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


@torch.no_grad()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, *,
                    text_chunk: int = 1024, image_chunk: int = 4096, device="cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each text's image among all images [M], rank of each image's best caption among all texts [N]).

    Ranks start at 1. An image without captions gets rank M + 1 (never retrieved)."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    t2i = text_to_image.long()
    img = image_emb.float()
    txt = text_emb.float()
    # Score of each text with its own image, and each image's best caption score.
    pos_t = torch.cat([(txt[c:c + text_chunk] * img[t2i[c:c + text_chunk]]).sum(dim=1)
                       for c in range(0, m, text_chunk)]) if m else torch.empty(0)
    best_i = torch.full((n,), float("-inf")).scatter_reduce(0, t2i, pos_t, reduce="amax", include_self=True)
    above_t = torch.zeros(m, dtype=torch.long)    # images scoring above each text's image
    above_i = torch.zeros(n, dtype=torch.long)    # non-captions scoring above each image's best caption
    dev = torch.device(device)
    img_d = img.to(dev)
    best_i_d = best_i.to(dev)
    for t0 in range(0, m, text_chunk):
        t1 = min(m, t0 + text_chunk)
        tx = txt[t0:t1].to(dev)
        own = t2i[t0:t1].to(dev)
        pt = pos_t[t0:t1].to(dev)
        acc_t = torch.zeros(t1 - t0, dtype=torch.long, device=dev)
        for i0 in range(0, n, image_chunk):
            i1 = min(n, i0 + image_chunk)
            s = tx @ img_d[i0:i1].T                                            # [texts, images] block
            # count everything above the positive's score, then take back the positives themselves
            # (a gather of one score per text: cheaper than masking the whole block)
            acc_t += (s > pt[:, None]).sum(dim=1)
            col_i = (s > best_i_d[None, i0:i1]).sum(dim=0)
            inside = ((own >= i0) & (own < i1)).nonzero().squeeze(1)
            if inside.numel():
                own_s = s[inside, own[inside] - i0]
                acc_t[inside] -= (own_s > pt[inside]).long()
                col_i.index_add_(0, own[inside] - i0, -(own_s > best_i_d[own[inside]]).long())
            above_i[i0:i1] += col_i.cpu()
        above_t[t0:t1] = acc_t.cpu()
    return above_t + 1, above_i + 1


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      recall_k: Sequence[int] = (1, 5, 10), **chunks) -> dict[str, float]:
    """R@k both ways under CLIP_benchmark's names, plus mean and median rank of the first correct item."""
    rank_t, rank_i = retrieval_ranks(image_emb, text_emb, text_to_image, **chunks)
    out: dict[str, float] = {}
    for k in recall_k:
        out[f"image_retrieval_recall@{k}"] = (rank_t <= k).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (rank_i <= k).float().mean().item()
    out["image_retrieval_mean_rank"] = float(rank_t.double().mean())
    out["image_retrieval_median_rank"] = float(np.median(rank_t.numpy()))
    out["text_retrieval_mean_rank"] = float(rank_i.double().mean())
    out["text_retrieval_median_rank"] = float(np.median(rank_i.numpy()))
    return out
