"""Losses across 2 gloo processes give the gradients of the 1-process full batch.

Convention checked (see vlp/losses.py): DDP averages parameter gradients over ranks, so the
rank-average of each rank's parameter gradients must equal the full-batch gradient, for the
encoder weights (reached through the features) and for logit_scale/logit_bias alike. The gradient
w.r.t. a rank's own *inputs* is not averaged by anything, and is W times the full-batch gradient of
those rows (each rank back-propagates its share of a loss whose rank-mean is the full loss, with
all W shares reaching every rank's features). One spawn per world size (2 and 4) runs every case.

The memory-flat losses (vlp/loss_blocks.py: SigLIP and InfoNCE rings, streaming log-sum-exp) are checked here for
exact gradients with chunks smaller than, equal to and larger than the local batch, and for their
per-rank memory: flat in the world size while the gathered path's grows (benchmarks/loss_memory.py).
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
    # memory-flat paths: chunks of 1 and 3 columns (ragged, positives crossing chunk edges) vs gathered logits
    "clip_gwg_local_gathered": dict(loss="clip", gather_with_grad=True, local_loss=True, loss_chunk_size=0),
    "clip_ls_gwg_local_chunk3": dict(loss="clip", label_smoothing=0.1, gather_with_grad=True, local_loss=True,
                                     loss_chunk_size=3),
    "dcl_gwg_local_chunk1": dict(loss="dcl", gather_with_grad=True, local_loss=True, loss_chunk_size=1),
    "infoloob_gwg_local_chunk3": dict(loss="infoloob", gather_with_grad=True, local_loss=True, loss_chunk_size=3),
    "siglip_gathered": dict(loss="siglip", loss_chunk_size=0),
    "siglip_chunk1": dict(loss="siglip", loss_chunk_size=1),
    "siglip_chunk3_terms": dict(loss="siglip", loss_chunk_size=3, **TERMS_ON),
}
# per-rank memory at a fixed local batch (small scale: logits dominate the B x D features)
MEM_BATCH, MEM_DIM, MEM_CHUNK = 1024, 4, 1024
MEM_CASES = {
    "siglip flat": dict(loss="siglip", loss_chunk_size=MEM_CHUNK),
    "siglip gathered": dict(loss="siglip", loss_chunk_size=0),
    "clip-local flat": dict(loss="clip", local_loss=True, gather_with_grad=True, loss_chunk_size=MEM_CHUNK),
    "clip-local gathered": dict(loss="clip", local_loss=True, gather_with_grad=True, loss_chunk_size=0),
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
    from benchmarks.loss_memory import loss_peak

    results["memory"] = {name: loss_peak(kw, rank, world, MEM_BATCH, MEM_DIM) for name, kw in MEM_CASES.items()}
    try:
        build_loss(LossConfig(local_loss=True), rank=rank, world_size=world)
        results["refused"] = False
    except ConfigError:
        results["refused"] = True
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(world: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


class _Spawned(dict):
    """world size -> every rank's results, spawned on first use (so `-m "not slow"` skips the 4-process run)."""

    def __missing__(self, world):
        self[world] = _spawn(world)
        return self[world]


@pytest.fixture(scope="module")
def ranks():
    return _Spawned()


@pytest.fixture(scope="module")
def two_ranks(ranks):
    return ranks[WORLD]


# 4 processes on a 2-core machine take ~20 s more; W=4 is the first world where a rank's two ring
# neighbours differ
WORLD_PARAMS = [WORLD, pytest.param(4, marks=pytest.mark.slow)]


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("world", WORLD_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_match_full_batch(ranks, case, world):
    ref = run_case(LossConfig(**CASES[case]), 0, 1)
    b = N // world
    for rank, res in enumerate(ranks[world]):
        r = res[case]
        for k in ref["grads"]:
            close(r["grads"][k], ref["grads"][k], f"{case} rank {rank} grad {k}")
        for k in ("x_img", "x_txt"):
            close(r[k], world * ref[k][rank * b:(rank + 1) * b], f"{case} rank {rank} input grad {k}")
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


@pytest.fixture(scope="module")
def one_rank_memory():
    from benchmarks.loss_memory import loss_peak

    return {name: loss_peak(kw, 0, 1, MEM_BATCH, MEM_DIM)["alloc"] for name, kw in MEM_CASES.items()}


@pytest.mark.parametrize("world", WORLD_PARAMS)
def test_flat_losses_per_rank_memory_does_not_grow_with_world_size(ranks, one_rank_memory, world):
    """Fixed local batch: the memory-flat losses' per-rank peak stays within 10% of the 1-process one,
    while the gathered path's grows about W-fold (the guard's own check that it sees growth)."""
    logits = MEM_BATCH * MEM_CHUNK * 4
    for name in MEM_CASES:
        peak = max(r["memory"][name]["alloc"] for r in ranks[world])
        growth = peak / one_rank_memory[name]
        if name.endswith("flat"):
            assert growth <= 1.10, f"{name}: {peak} bytes at W={world} vs {one_rank_memory[name]} at W=1"
            assert peak <= 3 * logits, f"{name} at W={world}: {peak} bytes"
        else:
            assert growth >= 0.8 * world, f"{name}: only {growth:.2f}x at W={world}"
