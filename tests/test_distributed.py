"""Losses across 2 gloo processes give the gradients of the 1-process full batch.

Convention checked (see vlp/losses.py): DDP averages parameter gradients over ranks, so the
rank-average of each rank's parameter gradients must equal the full-batch gradient, for the
encoder weights (reached through the features) and for logit_scale/logit_bias alike. The gradient
w.r.t. a rank's own *inputs* is not averaged by anything, and is W times the full-batch gradient of
those rows (each rank back-propagates its share of a loss whose rank-mean is the full loss, with
all W shares reaching every rank's features). One spawn runs every case, to keep this fast.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, LossConfig
from vlp.losses import build_loss

N, DIN, D, WORLD = 8, 6, 5, 2
TERMS_ON = dict(uniformity_weight=0.5, alignment_weight=1.0, cross_uniformity_weight=0.3,
                cyclip_inmodal_weight=0.25, cyclip_crossmodal_weight=0.25)
CASES = {
    "clip_gwg": dict(loss="clip", gather_with_grad=True),
    "clip_gwg_local": dict(loss="clip", gather_with_grad=True, local_loss=True),
    "clip_no_gwg": dict(loss="clip"),
    "clip_ls_terms_gwg_local": dict(loss="clip", label_smoothing=0.1, gather_with_grad=True, local_loss=True, **TERMS_ON),
    "clip_terms_no_gwg": dict(loss="clip", **TERMS_ON),
    "siglip": dict(loss="siglip"),
    "siglip_terms_gwg": dict(loss="siglip", gather_with_grad=True, **TERMS_ON),
    "dcl_gwg_local": dict(loss="dcl", gather_with_grad=True, local_loss=True),
    "infoloob_no_gwg": dict(loss="infoloob"),
}


def _params():
    g = torch.Generator().manual_seed(1)
    return {
        "w_img": torch.randn(DIN, D, generator=g, dtype=torch.float64).requires_grad_(),
        "w_txt": torch.randn(DIN, D, generator=g, dtype=torch.float64).requires_grad_(),
        "logit_scale": torch.tensor(2.3, dtype=torch.float64, requires_grad=True),
        "logit_bias": torch.tensor(-4.0, dtype=torch.float64, requires_grad=True),
    }


def _inputs():
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(N, DIN, generator=g, dtype=torch.float64)
    x_txt = x_img + 0.8 * torch.randn(N, DIN, generator=g, dtype=torch.float64)
    return x_img, x_txt


def run_case(cfg: LossConfig, rank: int, world: int) -> dict:
    """Forward/backward of rank `rank`'s share; with world 1 the full-batch reference."""
    p = _params()
    x_img, x_txt = _inputs()
    b = N // world
    xi = x_img[rank * b:(rank + 1) * b].clone().requires_grad_()
    xt = x_txt[rank * b:(rank + 1) * b].clone().requires_grad_()
    image = F.normalize(xi @ p["w_img"], dim=-1)
    text = F.normalize(xt @ p["w_txt"], dim=-1)
    bias = p["logit_bias"] if cfg.loss == "siglip" else None
    out = build_loss(cfg, rank=rank, world_size=world)(image, text, p["logit_scale"].exp(), bias)
    out["loss"].backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in p.items()}
    return {"grads": grads, "x_img": xi.grad, "x_txt": xt.grad,
            "values": {k: v.detach() for k, v in out.items()}, "features": (image.detach(), text.detach())}


def _open_clip_losses():
    """open_clip/loss.py loaded on its own (it needs only torch): importing the open_clip package
    costs each spawned worker several seconds."""
    import importlib.util

    pkg = importlib.util.find_spec("open_clip")
    path = os.path.join(pkg.submodule_search_locations[0], "loss.py")
    spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ClipLoss, mod.SigLipLoss


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from vlp import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {"world_info": distributed.world_info()}
    for name, kw in CASES.items():
        r = run_case(LossConfig(**kw), rank, world)
        for k, g in r["grads"].items():  # what DDP does to parameter gradients
            r["grads"][k] = distributed.reduce_mean(g)
        r["values_mean"] = {k: distributed.reduce_mean(v) for k, v in r["values"].items()}
        results[name] = r
    # open_clip's own losses on the same shards, for the per-rank values
    ClipLoss, SigLipLoss = _open_clip_losses()

    image, text = results["clip_gwg"]["features"]
    s = torch.tensor(2.3, dtype=torch.float64).exp()
    results["open_clip_local"] = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(image, text, s)
    results["open_clip_siglip"] = SigLipLoss(rank=rank, world_size=world)(image, text, s, torch.tensor(-4.0, dtype=torch.float64))
    try:
        build_loss(LossConfig(local_loss=True), rank=rank, world_size=world)
        results["refused"] = False
    except ConfigError:
        results["refused"] = True
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(WORLD, os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True,
                           start_method="spawn")
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_full_batch(two_ranks, case):
    ref = run_case(LossConfig(**CASES[case]), 0, 1)
    b = N // WORLD
    for rank, res in enumerate(two_ranks):
        r = res[case]
        for k in ref["grads"]:
            close(r["grads"][k], ref["grads"][k], f"{case} rank {rank} grad {k}")
        for k in ("x_img", "x_txt"):
            close(r[k], WORLD * ref[k][rank * b:(rank + 1) * b], f"{case} rank {rank} input grad {k}")
        assert set(r["values"]) == set(ref["values"])
        for k, v in ref["values"].items():
            close(r["values_mean"][k], v, f"{case} logged {k}")


def test_two_ranks_values_per_rank_match_open_clip(two_ranks):
    for rank, res in enumerate(two_ranks):
        assert res["world_info"] == (rank, WORLD)
        close(res["clip_gwg_local"]["values"]["clip"], res["open_clip_local"], "local clip vs open_clip")
        close(res["siglip"]["values"]["siglip"], res["open_clip_siglip"], "siglip vs open_clip bidir")
        # non-local: every rank holds the full-batch loss
        close(res["clip_gwg"]["values"]["clip"], two_ranks[0]["clip_gwg"]["values"]["clip"])


def test_local_loss_without_gather_with_grad_refused_on_ranks(two_ranks):
    assert all(res["refused"] for res in two_ranks)


def test_single_process_helpers_are_noops():
    from vlp import distributed

    assert distributed.world_info() == (0, 1)
    t = torch.arange(3.0, requires_grad=True)
    assert torch.equal(distributed.reduce_mean(t), t.detach())
    a, b = distributed.gather_features(t, t * 2, gather_with_grad=True)
    assert a is t
