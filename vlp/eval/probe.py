"""Linear probe: multinomial logistic regression on frozen, L2-normalised image features.

The CLIP paper's protocol (an L-BFGS logistic regression whose L2 strength is chosen on held-out data),
run full-batch in torch so 50k x 512 features take seconds on a CPU and nothing needs CUDA
(CLIP_benchmark's probe trains a linear layer with AdamW and calls `.cuda()` unconditionally).

Objective, for weights W [D, C] and bias b [C] (the bias is not penalised):

    mean_i CE(x_i W + b, y_i) + lam / 2 * ||W||^2

which is scikit-learn's `LogisticRegression(C=1 / (lam * n))` (it minimises C * sum CE + ||W||^2 / 2).
`lam` is chosen on a stratified held-out part of the train split over `LAMBDAS` (CLIP_benchmark's
weight-decay grid `logspace(-6, 2, 97)`), first at 7 coarse points, then by halving steps around the best;
the probe is then refitted on the whole train split with the chosen `lam`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from vlp.eval.zeroshot import classification_metrics

LAMBDAS = np.logspace(-6, 2, 97)
VAL_PROPORTION = 0.2


@dataclass
class Probe:
    weight: torch.Tensor        # [D, C]
    bias: torch.Tensor          # [C]
    lam: float
    iterations: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, self.weight.dtype)
        return (x @ self.weight + self.bias).float().cpu()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float, *,
                 init: Optional[Probe] = None, max_iter: int = 1000, tol: float = 1e-6,
                 device="cpu", dtype=torch.float32) -> Probe:
    """Full-batch L-BFGS (strong Wolfe line search) on the objective above; `init` warm-starts.

    The gradient is written out (softmax minus one-hot) rather than left to autograd: autograd's weight
    gradient is `x.T @ g`, a transposed tall-skinny product that BLAS runs ~12x slower on CPU than the
    `(g.T @ x).T` used here (50k x 512 features, 10 classes: 1.6 s vs 0.14 s per evaluation)."""
    dev = torch.device(device)
    x = x.to(dev, dtype)
    y = y.to(dev)
    n, d = x.shape
    onehot = torch.zeros(n, n_classes, device=dev, dtype=dtype)
    onehot[torch.arange(n, device=dev), y] = 1
    w = (init.weight.detach().clone() if init is not None else torch.zeros(d, n_classes)).to(dev, dtype)
    b = (init.bias.detach().clone() if init is not None else torch.zeros(n_classes)).to(dev, dtype)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        logits = x @ w + b
        logp = torch.log_softmax(logits, dim=1)
        loss = -(logp * onehot).sum() / n + 0.5 * lam * (w * w).sum()
        g = (logp.exp() - onehot) / n                     # d loss / d logits
        w.grad = (g.T @ x).T.contiguous() + lam * w
        b.grad = g.sum(dim=0)
        return loss

    with torch.no_grad():
        opt.step(closure)
    its = opt.state[opt._params[0]].get("n_iter", 0)
    return Probe(w.detach(), b.detach(), float(lam), int(its))


def stratified_split(y: torch.Tensor, proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): `proportion` of each class held out, at least one sample of each
    class kept for training (a class with one sample is never held out)."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = min(int(round(len(idx) * proportion)), len(idx) - 1)
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(held)).values


def fewshot_indices(y: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k samples of every class, drawn at random (seeded); DataError-style ValueError if a class has fewer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().squeeze(1)
        if len(idx) < k:
            raise ValueError(f"few-shot k={k}: class {c} has only {len(idx)} training samples")
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(out)).values


def select_lambda(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, n_classes: int, *,
                  grid=LAMBDAS, device="cpu") -> tuple[float, dict]:
    """The L2 strength with the best held-out (xv, yv) top-1 accuracy (ties: the stronger one, as
    CLIP_benchmark's search keeps the first best), and a log of the search.

    CLIP_benchmark's search: 7 coarse points (every 16th of the grid), then steps of 8, 4, 2, 1 grid points
    around the best so far; each fit is warm-started from the nearest strength already fitted."""
    fitted: dict[int, Probe] = {}
    scores: dict[int, float] = {}

    def score(i: int) -> float:
        if i not in scores:
            near = min(fitted, key=lambda j: abs(j - i), default=None)
            p = fit_logistic(x, y, n_classes, float(grid[i]), init=fitted.get(near), device=device)
            fitted[i] = p
            scores[i] = (p.logits(xv).argmax(1) == yv).float().mean().item()
        return scores[i]

    # strongest first: a heavily regularised fit converges fastest and warm-starts the weaker ones
    coarse = list(range(len(grid) - 1, -1, -16))
    best = max(coarse, key=score)
    step = 8
    while step >= 1:
        cands = [best] + [i for i in (best + step, best - step) if 0 <= i < len(grid)]
        best = max(cands, key=score)
        step //= 2
    return float(grid[best]), {"lambdas_fitted": len(scores), "held_out_acc1": scores[best]}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int, *, lam: Optional[float] = None, fewshot_k: int = -1, seed: int = 0,
                 val_proportion: float = VAL_PROPORTION, device="cpu") -> tuple[dict, dict]:
    """Fit on the train features, score the test features. Returns (metrics under CLIP_benchmark's `lp_*`
    names plus `lp_l2_lambda`, details).

    Unless `lam` is given, `val_proportion` of each class of the train split is held out to choose it;
    the final probe is fitted on the whole train split. Few-shot (`fewshot_k` > 0): k samples per class are
    drawn from the part not held out, the search validates on the held-out part, and the final probe sees
    the k samples per class only (CLIP_benchmark's protocol with `--val_proportion`)."""
    x = F.normalize(train_x.float(), dim=-1)
    y = train_y.long()
    fit_idx, val_idx = stratified_split(y, val_proportion if lam is None else 0.0, seed)
    if fewshot_k > 0:
        fit_idx = fit_idx[fewshot_indices(y[fit_idx], fewshot_k, seed)]
    info: dict = {"n_train": int(len(fit_idx) if fewshot_k > 0 else len(y)), "fewshot_k": int(fewshot_k)}
    if lam is None:
        if len(val_idx) == 0:
            raise ValueError("linear probe: no held-out train samples to choose the L2 strength "
                             "(every class has one sample)")
        lam, search = select_lambda(x[fit_idx], y[fit_idx], x[val_idx], y[val_idx], n_classes, device=device)
        info.update(search)
    final = fit_idx if fewshot_k > 0 else torch.arange(len(y))
    probe = fit_logistic(x[final], y[final], n_classes, lam, device=device)
    logits = probe.logits(F.normalize(test_x.float(), dim=-1))
    m = classification_metrics(logits, test_y.long(), n_classes)
    metrics = {"lp_acc1": m["acc1"], "lp_acc5": m["acc5"], "lp_mean_per_class_recall": m["mean_per_class_recall"],
               "lp_l2_lambda": lam}
    info["iterations"] = probe.iterations
    return metrics, info
