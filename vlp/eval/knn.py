"""k-NN classification on frozen features, DINO's protocol: cosine similarity of L2-normalised features,
the k most similar training samples vote for their class with weight exp(similarity / T), T = 0.07.

Test queries are scored in chunks against the whole train set, so memory is chunk x n_train.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

KS = (1, 10, 20)
TEMPERATURE = 0.07


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, n_classes: int, *,
                ks: Sequence[int] = KS, temperature: float = TEMPERATURE, chunk: int = 1024,
                device="cpu") -> dict[int, torch.Tensor]:
    """{k: predicted class of each test sample [N_test]} (vote ties go to the lowest class index)."""
    dev = torch.device(device)
    tr = F.normalize(train_x.float(), dim=-1).to(dev)
    ty = train_y.long().to(dev)
    kmax = min(max(ks), len(tr))
    out = {k: torch.empty(len(test_x), dtype=torch.long) for k in ks}
    for s in range(0, len(test_x), chunk):
        q = F.normalize(test_x[s:s + chunk].float(), dim=-1).to(dev)
        sim, idx = (q @ tr.T).topk(kmax, dim=1)            # most similar first
        w = (sim / temperature).exp()
        labels = ty[idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(len(q), n_classes, device=dev, dtype=w.dtype)
            votes.scatter_add_(1, labels[:, :kk], w[:, :kk])
            out[k][s:s + len(q)] = votes.argmax(dim=1).cpu()
    return out


def knn_metrics(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                n_classes: int, ks: Sequence[int] = KS, **kw) -> dict[str, float]:
    """`knn_acc1@k` for every k."""
    preds = knn_predict(train_x, train_y, test_x, n_classes, ks=ks, **kw)
    y = test_y.long()
    return {f"knn_acc1@{k}": (p == y).float().mean().item() for k, p in preds.items()}
