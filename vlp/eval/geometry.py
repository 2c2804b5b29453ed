"""Embedding geometry of a paired image/text set (the figures CLIP_benchmark does not report).

All keys are prefixed `geometry/`:
- `modality_gap`: ||mean(I) - mean(T)||_2 over paired, L2-normalised embeddings (centroid distance)
- `mean_paired_cosine`: mean_i <I_i, T_i>
- `alignment`: mean_i ||I_i - T_i||^2 (Wang & Isola, alpha = 2)
- `uniformity_image`, `uniformity_text`: log mean_{i<j} exp(-2 ||x_i - x_j||^2) (t = 2) over the distinct
  embeddings of each modality (images once each; class embeddings for a classification set); computed on at
  most `max_points` evenly spaced points, since it is quadratic
- `rankme_image`, `rankme_text`: exp(entropy of p), p = s / sum(s) + 1e-7 over the singular values s of the
  embedding matrix (Garrido et al.), over the same distinct embeddings
"""
from __future__ import annotations

import math
from typing import Optional

import torch

PREFIX = "geometry/"


def modality_gap(img: torch.Tensor, txt: torch.Tensor) -> float:
    return float((img.double().mean(0) - txt.double().mean(0)).norm())


def mean_paired_cosine(img: torch.Tensor, txt: torch.Tensor) -> float:
    return float((img.double() * txt.double()).sum(1).mean())


def alignment(img: torch.Tensor, txt: torch.Tensor, alpha: float = 2.0) -> float:
    return float((img.double() - txt.double()).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, max_points: int = 4096, chunk: int = 1024) -> float:
    """log of the mean over pairs i<j of exp(-t ||x_i - x_j||^2); chunked (exact for n <= max_points)."""
    x = x.double()
    n = x.shape[0]
    if n > max_points:
        x = x[torch.linspace(0, n - 1, max_points).round().long()]
        n = max_points
    if n < 2:
        return float("nan")
    sq = (x * x).sum(1)
    # log-sum-exp over the upper triangle, block by block
    terms = []
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        d2 = (sq[r0:r1, None] + sq[None, :] - 2 * x[r0:r1] @ x.T).clamp_min(0)
        upper = torch.arange(r0, r1)[:, None] < torch.arange(n)[None, :]
        v = (-t * d2)[upper]
        if v.numel():
            terms.append(torch.logsumexp(v, 0))
    total = torch.logsumexp(torch.stack(terms), 0)
    return float(total - math.log(n * (n - 1) / 2))


def rankme(x: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank from the singular values (via the D x D Gram matrix, so any N is cheap)."""
    x = x.double()
    if x.shape[0] == 0:
        return float("nan")
    if x.shape[0] <= 4 * x.shape[1]:
        s = torch.linalg.svdvals(x)
    else:
        s = torch.linalg.eigvalsh(x.T @ x).clamp_min(0).sqrt()
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def geometry_metrics(img_paired: torch.Tensor, txt_paired: torch.Tensor, img_distinct: Optional[torch.Tensor] = None,
                     txt_distinct: Optional[torch.Tensor] = None, max_points: int = 4096) -> dict[str, float]:
    """All geometry figures; rows of `img_paired` and `txt_paired` are matching pairs."""
    img_d = img_paired if img_distinct is None else img_distinct
    txt_d = txt_paired if txt_distinct is None else txt_distinct
    return {
        PREFIX + "modality_gap": modality_gap(img_paired, txt_paired),
        PREFIX + "mean_paired_cosine": mean_paired_cosine(img_paired, txt_paired),
        PREFIX + "alignment": alignment(img_paired, txt_paired),
        PREFIX + "uniformity_image": uniformity(img_d, max_points=max_points),
        PREFIX + "uniformity_text": uniformity(txt_d, max_points=max_points),
        PREFIX + "rankme_image": rankme(img_d),
        PREFIX + "rankme_text": rankme(txt_d),
    }
