"""Loss formulas against open_clip and against brute-force references written from reference.md."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.config import Config, ConfigError, LossConfig, validate
from vlp.losses import (BASE_LOSSES, TERMS, build_loss, clamp_logit_scale, prepare_model_for_loss)

D = torch.float64  # brute-force loops vs vectorised code: compare in double


def sc(x, grad=False):
    return torch.tensor(x, dtype=D, requires_grad=grad)


def feats(n=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(i + 0.7 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return i.requires_grad_(), t.requires_grad_()


def sq(a, b):
    return sum((a[k] - b[k]) ** 2 for k in range(a.shape[0]))


# ------------------------------------------------------------------------------------------- clip

def test_clip_equals_open_clip_ClipLoss_value_and_grad():
    from open_clip.loss import ClipLoss

    I, T = feats(8, 6, dtype=torch.float32)
    s = torch.tensor(14.3, dtype=torch.float32, requires_grad=True)
    ours = build_loss(LossConfig(loss="clip"))(I, T, s)
    ref = ClipLoss()(I, T, s)
    assert set(ours) == {"loss", "clip"}
    assert abs(ours["clip"].item() - ref.item()) < 1e-6
    assert torch.equal(ours["loss"], ours["clip"])
    g_ours = torch.autograd.grad(ours["loss"], (I, T, s))
    g_ref = torch.autograd.grad(ref, (I, T, s))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_clip_label_smoothing_vs_explicit_cross_entropy():
    # open_clip 3.3's ClipLoss has no label smoothing: compare with the smoothed CE written out.
    I, T = feats(7, 4)
    s, eps = sc(9.0), 0.1
    n = I.shape[0]

    def smoothed_ce(logits):
        total = 0.0
        for r in range(n):
            logp = logits[r] - torch.logsumexp(logits[r], 0)
            target = [eps / n + (1 - eps) * (c == r) for c in range(n)]
            total = total - sum(target[c] * logp[c] for c in range(n))
        return total / n

    L = s * I @ T.T
    ref = (smoothed_ce(L) + smoothed_ce(L.T)) / 2
    out = build_loss(LossConfig(loss="clip", label_smoothing=eps))(I, T, s)
    assert abs(out["clip"].item() - ref.item()) < 1e-10
    plain = build_loss(LossConfig(loss="clip"))(I, T, s)["clip"]
    assert abs(out["clip"].item() - plain.item()) > 1e-3


# ----------------------------------------------------------------------------------- base losses

def brute_siglip(I, T, s, b):
    n = I.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = s * sum(I[i, k] * T[j, k] for k in range(I.shape[1])) + b
            total = total - math.log(1 / (1 + math.exp(-z * float(logit))))
    return total / n


def test_siglip_vs_brute_force_and_open_clip():
    from open_clip.loss import SigLipLoss

    I, T = feats(6, 4, seed=1)
    s, b = sc(10.0), sc(-10.0 + 3.0)
    out = build_loss(LossConfig(loss="siglip"))(I, T, s, b)
    assert set(out) == {"loss", "siglip"}
    assert abs(out["siglip"].item() - brute_siglip(I.detach(), T.detach(), s, b)) < 1e-10
    assert abs(out["siglip"].item() - SigLipLoss()(I, T, s, b).item()) < 1e-10


def brute_dcl(I, T, s):
    n = I.shape[0]

    def direction(A, B):
        total = 0.0
        for i in range(n):
            L = [float(s * (A[i] * B[j]).sum()) for j in range(n)]
            total += -L[i] + math.log(sum(math.exp(L[j]) for j in range(n) if j != i))
        return total / n

    return (direction(I, T) + direction(T, I)) / 2


def test_dcl_and_infoloob_vs_brute_force():
    I, T = feats(6, 4, seed=2)
    s = sc(7.0)
    ref = brute_dcl(I.detach(), T.detach(), s)
    dcl = build_loss(LossConfig(loss="dcl"))(I, T, s)
    assert abs(dcl["dcl"].item() - ref) < 1e-10
    loob = build_loss(LossConfig(loss="infoloob"))(I, T, s)
    assert abs(loob["infoloob"].item() - ref / 7.0) < 1e-10
    # DCL differs from CLIP exactly by the positive being left out of the denominator.
    assert dcl["dcl"].item() < build_loss(LossConfig(loss="clip"))(I, T, s)["clip"].item()


def test_infoloob_temperature_gradient_flows():
    I, T = feats(5, 4, seed=3)
    s = sc(5.0, grad=True)
    build_loss(LossConfig(loss="infoloob"))(I, T, s)["loss"].backward()
    assert s.grad is not None and s.grad.abs() > 0


# -------------------------------------------------------------------------------- additive terms

def brute_unif(x):
    n = x.shape[0]
    vals = [math.exp(-2 * float(sq(x[i], x[j]))) for i in range(n) for j in range(i + 1, n)]
    return math.log(sum(vals) / len(vals))


def test_uniformity_vs_pdist_formula_and_brute_force():
    I, T = feats(7, 5, seed=4)
    out = build_loss(LossConfig(uniformity_weight=0.3))(I, T, sc(10.0))
    pd = lambda x: torch.pdist(x).pow(2).mul(-2).exp().mean().log()  # noqa: E731 - reference.md
    ref = (pd(I.detach()) + pd(T.detach())) / 2
    assert abs(out["uniformity"].item() - ref.item()) < 1e-10
    assert abs(out["uniformity"].item() - (brute_unif(I.detach()) + brute_unif(T.detach())) / 2) < 1e-10
    assert abs(out["loss"].item() - (out["clip"] + 0.3 * out["uniformity"]).item()) < 1e-12


def test_uniformity_gradient_finite_with_duplicate_points():
    # pdist's backward is NaN at zero distance; ours must not be.
    I, T = feats(5, 4, seed=5)
    I2 = torch.cat([I[:1], I[:1], I[2:]]).detach().requires_grad_()
    TERMS["uniformity"](I2, T).backward()
    assert torch.isfinite(I2.grad).all()


def test_alignment_cross_uniformity_cyclip_vs_brute_force():
    I, T = feats(6, 4, seed=6)
    cfg = LossConfig(alignment_weight=1.0, cross_uniformity_weight=0.5, cyclip_inmodal_weight=0.25,
                     cyclip_crossmodal_weight=0.25)
    out = build_loss(cfg)(I, T, sc(10.0))
    Id, Td = I.detach(), T.detach()
    n = Id.shape[0]
    align = sum(float(sq(Id[i], Td[i])) for i in range(n)) / n
    xu = [math.exp(-2 * float(sq(Id[i], Td[j]))) for i in range(n) for j in range(n) if i != j]
    xunif = math.log(sum(xu) / len(xu))
    dot = lambda a, b: float((a * b).sum())  # noqa: E731
    inm = sum((dot(Id[i], Id[j]) - dot(Td[i], Td[j])) ** 2 for i in range(n) for j in range(n)) / n ** 2
    crm = sum((dot(Id[i], Td[j]) - dot(Td[i], Id[j])) ** 2 for i in range(n) for j in range(n)) / n ** 2
    assert abs(out["alignment"].item() - align) < 1e-10
    assert abs(out["cross_uniformity"].item() - xunif) < 1e-10
    assert abs(out["cyclip_inmodal"].item() - inm) < 1e-10
    assert abs(out["cyclip_crossmodal"].item() - crm) < 1e-10
    assert "uniformity" not in out  # zero weight: not computed
    want = out["clip"] + out["alignment"] + 0.5 * out["cross_uniformity"] + 0.25 * (
        out["cyclip_inmodal"] + out["cyclip_crossmodal"])
    assert abs(out["loss"].item() - want.item()) < 1e-12


def test_all_combinations_backprop():
    for base in BASE_LOSSES:
        I, T = feats(5, 4, seed=7)
        s = sc(10.0, grad=True)
        b = sc(-1.0, grad=True)
        cfg = LossConfig(loss=base, **{f"{k}_weight": 0.1 for k in TERMS})
        out = build_loss(cfg)(I, T, s, b)
        assert set(out) == {"loss", base, *TERMS}
        out["loss"].backward()
        assert torch.isfinite(I.grad).all() and torch.isfinite(s.grad)


def test_half_precision_features_are_promoted():
    I, T = feats(6, 4, seed=8, dtype=torch.float32)
    out16 = build_loss(LossConfig(uniformity_weight=1.0))(I.bfloat16(), T.bfloat16(), torch.tensor(10.0))
    assert out16["loss"].dtype == torch.float32


# -------------------------------------------------------------------------------- config / model

def test_local_loss_without_gather_with_grad_is_refused():
    with pytest.raises(ConfigError):
        build_loss(LossConfig(local_loss=True), rank=0, world_size=2)
    cfg = Config()
    cfg.loss.local_loss = True
    with pytest.raises(ConfigError):
        validate(cfg)


def test_label_smoothing_only_for_clip():
    cfg = Config()
    cfg.loss.loss, cfg.loss.label_smoothing = "dcl", 0.1
    with pytest.raises(ConfigError):
        validate(cfg)


class TinyCLIP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float32))
        self.logit_bias = None


def test_prepare_model_for_siglip_adds_bias_and_sets_scale():
    m = TinyCLIP()
    prepare_model_for_loss(m, LossConfig(loss="clip"))
    assert m.logit_bias is None
    model_cfg = {"embed_dim": 8}
    prepare_model_for_loss(m, LossConfig(loss="siglip"), model_cfg=model_cfg)
    assert isinstance(m.logit_bias, torch.nn.Parameter) and m.logit_bias.item() == -10.0
    assert "logit_bias" in dict(m.named_parameters())
    assert abs(m.logit_scale.item() - math.log(10)) < 1e-6
    assert model_cfg["init_logit_bias"] == -10.0
    with torch.no_grad():
        m.logit_bias.fill_(-3.0)
    prepare_model_for_loss(m, LossConfig(loss="siglip"))  # already has a bias: untouched
    assert m.logit_bias.item() == -3.0


def test_prepare_open_clip_model_for_siglip_forward_returns_bias(micro_model_json):
    from vlp.models import create_model

    bundle = create_model(micro_model_json)
    model = bundle.model
    prepare_model_for_loss(model, LossConfig(loss="siglip"), model_cfg=bundle.model_cfg)
    out = model(torch.zeros(2, 3, 32, 32, dtype=torch.float32), bundle.tokenizer(["a", "b"]))
    assert out["logit_bias"].item() == -10.0 and abs(out["logit_scale"].item() - 10.0) < 1e-4
    from open_clip.model import CLIP

    rebuilt = CLIP(**bundle.model_cfg)
    rebuilt.load_state_dict(model.state_dict())  # the recorded init_logit_bias gives the parameter


def test_clamp_logit_scale():
    m = TinyCLIP()
    with torch.no_grad():
        m.logit_scale.fill_(7.0)
    clamp_logit_scale(m)
    assert abs(m.logit_scale.item() - math.log(100)) < 1e-6
    with torch.no_grad():
        m.logit_scale.fill_(-1.0)
    wrapper = torch.nn.Module()
    wrapper.module = m  # DDP-style wrapper
    clamp_logit_scale(wrapper)
    assert m.logit_scale.item() == 0.0
    with torch.no_grad():
        m.logit_scale.fill_(2.0)
    clamp_logit_scale(m)
    assert m.logit_scale.item() == 2.0


# ------------------------------------------------------------------------------- memory-flat paths

@pytest.mark.parametrize("kw", [
    dict(loss="siglip"),
    dict(loss="clip", local_loss=True, gather_with_grad=True),
    dict(loss="clip", local_loss=True, gather_with_grad=True, label_smoothing=0.1),
    dict(loss="dcl", local_loss=True, gather_with_grad=True),
    dict(loss="infoloob", local_loss=True, gather_with_grad=True),
])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_paths_equal_gathered_logits(kw, chunk):
    """Chunks of 1, 3 (ragged, positives crossing chunk edges), 7 and more than N: same value and
    gradients (features, scale, bias) as the path that holds all logits (loss_chunk_size=0)."""
    results = []
    for size in (0, chunk):
        I, T = feats(7, 5, seed=3)
        s, b = sc(9.0, True), sc(-2.5, True)
        out = build_loss(LossConfig(loss_chunk_size=size, **kw))(I, T, s, b)
        out["loss"].backward()
        results.append((out["loss"].detach(), I.grad, T.grad, s.grad, b.grad))
    for ref, new in zip(*results):
        torch.testing.assert_close(new, ref, atol=1e-12, rtol=1e-10)


def test_chunked_siglip_under_bf16_autocast_stays_float32():
    I, T = feats(6, 5, dtype=torch.float32)
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    ref = build_loss(LossConfig(loss="siglip", loss_chunk_size=0))(I, T, s, b)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build_loss(LossConfig(loss="siglip", loss_chunk_size=2))(I.bfloat16(), T.bfloat16(), s, b)["loss"]
    assert out.dtype == torch.float32
    # only the bf16 rounding of the features differs, not the loss arithmetic
    ref16 = build_loss(LossConfig(loss="siglip", loss_chunk_size=0))(I.bfloat16().float(), T.bfloat16().float(), s, b)
    torch.testing.assert_close(out, ref16["loss"], atol=1e-5, rtol=1e-6)
    assert abs(out.item() - ref.item()) < 0.05


def test_negative_loss_chunk_size_is_refused():
    with pytest.raises(ConfigError, match="loss-chunk-size"):
        build_loss(LossConfig(loss_chunk_size=-1))
    cfg = Config()
    cfg.loss.loss_chunk_size = -1
    with pytest.raises(ConfigError, match="loss-chunk-size"):
        validate(cfg)


@pytest.mark.parametrize("kw", [dict(), dict(loss="siglip", loss_chunk_size=0), dict(loss="siglip"),
                                dict(loss="dcl"), dict(cyclip_inmodal_weight=0.25, cross_uniformity_weight=0.3)])
def test_loss_under_bf16_autocast_is_float32(kw):
    # the training step calls the loss inside autocast: the gathered paths' logits matmul ran in bf16 there
    # (CLIP feature-gradient rel. error ~1e-2, SigLIP 66.0 for 65.767); every path must compute in float32
    g = torch.Generator().manual_seed(3)
    I, T = (F.normalize(torch.randn(64, 32, generator=g), dim=-1) for _ in range(2))
    s, b = torch.tensor(10.0), torch.tensor(-10.0) if kw.get("loss") == "siglip" else None
    results = []
    for autocast in (False, True):
        i, t = I.clone().requires_grad_(), T.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = build_loss(LossConfig(**kw))(i, t, s, b)
        out["loss"].backward()
        results.append((out["loss"].detach(), i.grad, t.grad))
    for ref, new in zip(*results):
        assert new.dtype == torch.float32
        torch.testing.assert_close(new, ref, atol=1e-6, rtol=1e-5)
