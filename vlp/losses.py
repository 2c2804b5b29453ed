"""Contrastive losses and additive geometry terms, with gathering across ranks inside.

Every function takes L2-normalised features `I`, `T` ([N, D], row i of each a matching pair),
`logit_scale` already exponentiated (`s`), and optionally `logit_bias` (`b`); see
shared/reference.md (beside the clone) for the formulas. `build_loss`'s losses compute in float32
whatever the caller's autocast (it is switched off inside, and 16-bit features, scale and bias are
promoted): a bf16 logits matmul would cost ~1e-2 relative error in the feature gradients.

Base losses (`BASE_LOSSES`): `clip`, `siglip`, `dcl`, `infoloob`. They also accept
`all_image`/`all_text` (the gathered batch) and `offset` (the global index of the first local row)
to score only the local rows against every column ("local loss"); left out, the local tensors are
the whole batch.

Additive terms (`TERMS`, weights from LossConfig `<name>_weight`): `uniformity`, `alignment`,
`cross_uniformity`, `cyclip_inmodal`, `cyclip_crossmodal`.

Across ranks (`build_loss(cfg, rank, world_size)` with world_size > 1)
----------------------------------------------------------------------
Convention: DDP averages gradients over ranks, so each rank's loss is built such that the
**rank-average of the per-rank parameter gradients equals the gradient of the full-batch loss**
(the loss on all W*B pairs computed in one process). Concretely, on every rank the gradient
reaching the local features is W x d(full loss)/d(local features), and the gradient reaching
`logit_scale`/`logit_bias` is a per-rank share whose rank-average is the full-batch gradient.

* `clip`/`dcl`/`infoloob`, not local: every rank computes the full N x N loss on the gathered
  features (the same value on all ranks). With `gather_with_grad` the all_gather backward sums the
  W identical losses' gradients (factor W). Without it only the local slot carries gradient
  (factor 1), so the local features' gradient is multiplied by W in the backward (`_scale_grad`)
  to keep both modes on the same, exact convention. (open_clip leaves that factor out: its feature
  gradients are 1/W of the full-batch ones while logit_scale's are not.)
* `local_loss` (needs `gather_with_grad`; refused otherwise): rank r scores its B rows against all
  N columns in both directions, labels `arange(B) + r*B`. Its loss value is a local estimate;
  the mean over ranks is the full-batch loss.
* `siglip`: always the local form (rank r's B images against all N texts, positives at
  `r*B + i`, sum / B), with autograd-aware gathering whatever `gather_with_grad` says: this is
  exact (equivalent to open_clip's neighbour exchange). Rank-mean of the values = full loss.
* Additive terms are computed on the gathered features, i.e. on the whole global batch, on every
  rank (same value everywhere); gradients follow the same convention.

Memory-flat paths (`loss_chunk_size` > 0, the default; vlp/loss_blocks.py), same values and gradients:
* `siglip` (any world size): text blocks are passed round a ring of ranks instead of gathered, and
  logits are formed B x chunk at a time and recomputed in the backward.
* `local_loss` with `clip`/`dcl`/`infoloob` (any world size; one process: the full loss): image and
  text blocks go round the ring and both directions' log-sum-exp over all N columns is accumulated
  block by block, chunk by chunk; the positive logits cost only B x D.
Both hold at most B x chunk logits (forward and backward) and no other rank's features beyond the
block in flight; gathering happens only for the additive terms.
`loss_chunk_size=0` keeps the gathered path (all B x N logits held), e.g. to measure against it.

So `vlp.distributed.reduce_mean(out[key])` is the full-batch value of every key in every mode.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vlp.config import ConfigError, LossConfig
from vlp import distributed
from vlp.loss_blocks import lse_ring, siglip_ring

LOGIT_SCALE_MAX = math.log(100.0)
SIGLIP_INIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


# ----------------------------------------------------------------------------- helpers

def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _defaults(image_features, text_features, all_image, all_text):
    image_features, text_features = _f32(image_features), _f32(text_features)
    all_image = image_features if all_image is None else _f32(all_image)
    all_text = text_features if all_text is None else _f32(all_text)
    return image_features, text_features, all_image, all_text


def _labels(n: int, offset: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.long) + offset


def _logits(rows, cols, logit_scale, logit_bias):
    logits = logit_scale * rows @ cols.T
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 without a square root (differentiable at zero distance)."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.T
    return d.clamp_min(0.0)


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, dim=0) - math.log(x.numel())


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by `factor` in the backward."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


# ----------------------------------------------------------------------------- base losses

def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, label_smoothing: float = 0.0,
              all_image=None, all_text=None, offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(s I T^T, y) + CE(s T I^T, y)) / 2, optional label smoothing."""
    I, T, AI, AT = _defaults(image_features, text_features, all_image, all_text)
    y = _labels(I.shape[0], offset, I.device)
    return (F.cross_entropy(_logits(I, AT, logit_scale, logit_bias), y, label_smoothing=label_smoothing)
            + F.cross_entropy(_logits(T, AI, logit_scale, logit_bias), y, label_smoothing=label_smoothing)) / 2


def _dcl_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pos = logits.gather(1, labels[:, None]).squeeze(1)
    neg = logits.scatter(1, labels[:, None], float("-inf"))
    return (torch.logsumexp(neg, dim=1) - pos).mean()


def dcl_loss(image_features, text_features, logit_scale, logit_bias=None, *,
             all_image=None, all_text=None, offset: int = 0) -> torch.Tensor:
    """Decoupled contrastive loss: mean over rows of -L_ii + logsumexp_{j != i} L_ij, both directions averaged."""
    I, T, AI, AT = _defaults(image_features, text_features, all_image, all_text)
    y = _labels(I.shape[0], offset, I.device)
    return (_dcl_rows(_logits(I, AT, logit_scale, logit_bias), y)
            + _dcl_rows(_logits(T, AI, logit_scale, logit_bias), y)) / 2


def infoloob_loss(image_features, text_features, logit_scale, logit_bias=None, *,
                  all_image=None, all_text=None, offset: int = 0) -> torch.Tensor:
    """InfoLOOB (CLOOB's objective, without its Hopfield retrieval): the DCL form times the temperature 1/s.

    CLOOB sums the two directions; here they are averaged like every other loss (a factor 2)."""
    return dcl_loss(image_features, text_features, logit_scale, logit_bias, all_image=all_image,
                    all_text=all_text, offset=offset) / logit_scale


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *,
                all_image=None, all_text=None, offset: int = 0) -> torch.Tensor:
    """Sigmoid loss: -sum log sigmoid(z_ij (s I_i.T_j + b)) / B, z = +1 on pairs, -1 elsewhere.

    With `all_text`, the local B images are scored against all N texts (positives at offset + i)."""
    I, _, _, AT = _defaults(image_features, text_features, all_image, all_text)
    logits = _logits(I, AT, logit_scale, logit_bias)
    z = -torch.ones_like(logits)
    rows = torch.arange(I.shape[0], device=I.device)
    z[rows, rows + offset] = 1.0
    return -F.logsigmoid(z * logits).sum() / I.shape[0]


def _ring_local(base_name: str, label_smoothing: float, rank: int, world_size: int, chunk: int):
    """Rank r's local loss of `base_name` (its rows against every rank's columns) via `lse_ring`: no gathering."""
    decoupled = base_name in ("dcl", "infoloob")

    def fn(image_features, text_features, logit_scale, logit_bias=None):
        I, T = _f32(image_features), _f32(text_features)
        lse_i, lse_t = lse_ring(I, T, logit_scale, logit_bias, rank, world_size, chunk, exclude_positive=decoupled)
        pos = logit_scale * (I * T).sum(1)
        if logit_bias is not None:
            pos = pos + logit_bias
        if not label_smoothing:
            value = ((lse_i - pos).mean() + (lse_t - pos).mean()) / 2
        else:  # CE with smoothing e: lse - (1-e) * positive - e * mean of the row's logits over all N columns
            n = I.shape[0] * world_size
            mean_t = distributed.all_reduce_sum_with_grad(T.sum(0, keepdim=True)) / n
            mean_i = distributed.all_reduce_sum_with_grad(I.sum(0, keepdim=True)) / n
            e = label_smoothing
            rows_i = _logits(I, mean_t, logit_scale, logit_bias).squeeze(1)
            rows_t = _logits(T, mean_i, logit_scale, logit_bias).squeeze(1)
            value = ((lse_i - (1 - e) * pos - e * rows_i).mean() + (lse_t - (1 - e) * pos - e * rows_t).mean()) / 2
        return value / logit_scale if base_name == "infoloob" else value

    return fn


BASE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "clip": clip_loss,
    "siglip": siglip_loss,
    "dcl": dcl_loss,
    "infoloob": infoloob_loss,
}


# ----------------------------------------------------------------------------- additive terms

def unif(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola uniformity: log mean over pairs i<j of exp(-t ||x_i - x_j||^2)."""
    x = _f32(x)
    n = x.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    return _log_mean_exp(-t * _sq_dists(x, x)[iu[0], iu[1]])


def uniformity(image_features, text_features, logit_scale=None, logit_bias=None) -> torch.Tensor:
    """(unif(I) + unif(T)) / 2."""
    return (unif(image_features) + unif(text_features)) / 2


def alignment(image_features, text_features, logit_scale=None, logit_bias=None, alpha: float = 2.0) -> torch.Tensor:
    """mean_i ||I_i - T_i||^alpha."""
    diff = _f32(image_features) - _f32(text_features)
    sq = diff.pow(2).sum(1)
    return sq.mean() if alpha == 2 else sq.clamp_min(1e-12).pow(alpha / 2).mean()


def cross_uniformity(image_features, text_features, logit_scale=None, logit_bias=None, t: float = 2.0) -> torch.Tensor:
    """log mean over i != j of exp(-t ||I_i - T_j||^2)."""
    I, T = _f32(image_features), _f32(text_features)
    off = ~torch.eye(I.shape[0], dtype=torch.bool, device=I.device)
    return _log_mean_exp(-t * _sq_dists(I, T)[off])


def cyclip_inmodal(image_features, text_features, logit_scale=None, logit_bias=None) -> torch.Tensor:
    """CyCLIP in-modal consistency: mean((I I^T - T T^T)^2), in cosine units.

    (CyCLIP's code multiplies by the batch size; weight 0.25 there is 0.25*N here.)"""
    I, T = _f32(image_features), _f32(text_features)
    return (I @ I.T - T @ T.T).pow(2).mean()


def cyclip_crossmodal(image_features, text_features, logit_scale=None, logit_bias=None) -> torch.Tensor:
    """CyCLIP cross-modal consistency: mean((I T^T - T I^T)^2), in cosine units."""
    I, T = _f32(image_features), _f32(text_features)
    s = I @ T.T
    return (s - s.T).pow(2).mean()


TERMS: dict[str, Callable[..., torch.Tensor]] = {
    "uniformity": uniformity,
    "alignment": alignment,
    "cross_uniformity": cross_uniformity,
    "cyclip_inmodal": cyclip_inmodal,
    "cyclip_crossmodal": cyclip_crossmodal,
}


def term_weights(cfg: LossConfig) -> dict[str, float]:
    """The additive terms switched on (non-zero weight) and their weights."""
    return {name: float(getattr(cfg, f"{name}_weight")) for name in TERMS if getattr(cfg, f"{name}_weight")}


# ----------------------------------------------------------------------------- build

LossOutput = dict[str, torch.Tensor]


def build_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1
               ) -> Callable[..., LossOutput]:
    """`fn(image_features, text_features, logit_scale, logit_bias=None) -> {"loss", <base>, <terms>...}`.

    "loss" is base + sum(weight * term); the other entries are unweighted. Only terms with a
    non-zero weight are computed. See the module docstring for the behaviour across ranks."""
    if cfg.loss not in BASE_LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(BASE_LOSSES)} (got {cfg.loss!r})")
    if cfg.local_loss and not cfg.gather_with_grad:
        raise ConfigError("--local-loss needs --gather-with-grad: without it the gradients are biased")
    if cfg.label_smoothing and cfg.loss != "clip":
        raise ConfigError("--label-smoothing applies to the clip loss only")
    base_name = cfg.loss
    base = BASE_LOSSES[base_name]
    base_kwargs = {"label_smoothing": cfg.label_smoothing} if base_name == "clip" else {}
    if cfg.loss_chunk_size < 0:
        raise ConfigError("--loss-chunk-size must be 0 (gathered logits) or more")
    weights = term_weights(cfg)
    distributed_ = world_size > 1
    chunk = cfg.loss_chunk_size
    ring = None  # the memory-flat base loss: its features are passed round the ranks, never gathered
    if chunk > 0 and base_name == "siglip":
        def ring(I, T, s, b):
            return siglip_ring(_f32(I), _f32(T), s, b, rank, world_size, chunk)
    elif chunk > 0 and cfg.local_loss:
        ring = _ring_local(base_name, cfg.label_smoothing, rank, world_size, chunk)
    local = distributed_ and (cfg.local_loss or base_name == "siglip")
    with_grad = cfg.gather_with_grad or local

    def loss_fn(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None) -> LossOutput:
        if distributed_ and not distributed.is_initialized():
            raise RuntimeError(f"build_loss(world_size={world_size}) needs an initialised torch.distributed group")
        # float32 arithmetic on every path (the rings do the same inside): the step calls this under autocast
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            return _float32_loss(_f32(image_features), _f32(text_features), _f32(logit_scale),
                                 None if logit_bias is None else _f32(logit_bias))

    def _float32_loss(image_features, text_features, logit_scale, logit_bias) -> LossOutput:
        all_image, all_text = image_features, text_features
        if distributed_ and (weights or ring is None):  # the ring itself needs no gathered features
            if not with_grad:
                # Only the local slot carries gradient: restore the factor W the gathered-with-grad
                # path gets from summing every rank's (identical) loss. See module docstring.
                image_features = _scale_grad(image_features, world_size)
                text_features = _scale_grad(text_features, world_size)
            all_image, all_text = distributed.gather_features(
                image_features, text_features, gather_with_grad=with_grad, rank=rank, world_size=world_size)
        out: LossOutput = {}
        if ring is not None:
            value = ring(image_features, text_features, logit_scale, logit_bias)
        elif local:
            b = image_features.shape[0]
            value = base(image_features, text_features, logit_scale, logit_bias,
                         all_image=all_image, all_text=all_text, offset=rank * b, **base_kwargs)
        else:
            value = base(all_image, all_text, logit_scale, logit_bias, **base_kwargs)
        out[base_name] = value
        total = value
        for name, w in weights.items():
            term = TERMS[name](all_image, all_text)
            out[name] = term
            total = total + w * term
        out = {"loss": total, **out}
        return out

    loss_fn.base = base_name  # type: ignore[attr-defined]
    loss_fn.weights = dict(weights)  # type: ignore[attr-defined]
    return loss_fn


# ----------------------------------------------------------------------------- model hooks

def prepare_model_for_loss(model: torch.nn.Module, cfg: LossConfig, model_cfg: Optional[dict] = None) -> torch.nn.Module:
    """Give a model what its loss needs. For `siglip` on a model without a `logit_bias`: add a
    learnable bias (init -10, shaped like `logit_scale`) and set `logit_scale` to ln 10. A model
    that already has a bias (SigLIP weights, or a run being resumed) is left alone.

    Call before building the optimiser and before loading a checkpoint's state. If `model_cfg` (the
    open_clip tower config stored with checkpoints) is given, `init_logit_bias` is recorded in it
    so that a model rebuilt from that config has the `logit_bias` parameter its weights need."""
    net = distributed.unwrap(model)
    if cfg.loss == "siglip" and getattr(net, "logit_bias", None) is None:
        scale = net.logit_scale
        with torch.no_grad():
            scale.fill_(SIGLIP_INIT_SCALE)
        net.logit_bias = torch.nn.Parameter(torch.full_like(scale.detach(), SIGLIP_INIT_BIAS))
        if model_cfg is not None:
            model_cfg["init_logit_bias"] = SIGLIP_INIT_BIAS
            model_cfg["init_logit_scale"] = SIGLIP_INIT_SCALE
    return model


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module, max_value: float = LOGIT_SCALE_MAX) -> None:
    """Clamp `logit_scale` (log space) in place to [0, ln 100]; call after every optimiser step."""
    net = distributed.unwrap(model)
    scale = getattr(net, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.clamp_(0, max_value)
