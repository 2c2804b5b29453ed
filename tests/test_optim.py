"""Weight-decay groups and learning-rate schedules."""
from __future__ import annotations

import math

import pytest
import torch

from vlp.config import ConfigError, OptimConfig
from vlp.train.optim import build_optimizer, build_scheduler, param_groups, split_decay


@pytest.fixture(scope="module")
def micro_model(micro_model_json):
    from vlp.models import create_model

    return create_model(micro_model_json).model


def open_clip_train_excluded(model):
    # open_clip_train/main.py's rule, verbatim
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    return {n for n, p in model.named_parameters() if exclude(n, p) and p.requires_grad}


def test_param_groups_partition_and_exclusions(micro_model):
    groups = param_groups(micro_model, wd=0.2)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in micro_model.parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]

    decay, no_decay = split_decay(micro_model)
    params = dict(micro_model.named_parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(params[n]) for n in no_decay}
    ours = set(no_decay)
    theirs = open_clip_train_excluded(micro_model)
    assert theirs <= ours
    assert ours - theirs == {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"}
    for n in ("logit_scale", "visual.class_embedding", "ln_final.weight", "ln_final.bias",
              "visual.ln_pre.weight"):
        assert n in ours, n
    for n in ("visual.conv1.weight", "text_projection", "visual.proj"):
        assert n in decay, n
    assert all(params[n].ndim >= 2 for n in decay)


def test_param_groups_skip_frozen_and_include_siglip_bias(micro_model_json):
    from vlp.config import LossConfig
    from vlp.losses import prepare_model_for_loss
    from vlp.models import create_model

    model = create_model(micro_model_json).model
    prepare_model_for_loss(model, LossConfig(loss="siglip"))
    model.lock_image_tower()
    decay, no_decay = split_decay(model)
    assert "logit_bias" in no_decay
    assert not any(n.startswith("visual.") for n in decay + no_decay)


def test_build_optimizer_adamw_settings(micro_model):
    cfg = OptimConfig(lr=1e-3, wd=0.5, beta1=0.8, beta2=0.95, eps=1e-8)
    opt = build_optimizer(micro_model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-8 and g["lr"] == 1e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


# ------------------------------------------------------------------------------------- schedules

def lrs(cfg: OptimConfig, total: int, steps_per_epoch: int = 1, upto: int | None = None) -> list[float]:
    """lr used for optimiser steps 0..upto-1, driving the scheduler as the training loop does."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=total, steps_per_epoch=steps_per_epoch)
    out = []
    for _ in range(total if upto is None else upto):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def approx(a, b):
    return abs(a - b) < 1e-12


def test_cosine_matches_open_clip_train():
    from open_clip_train.scheduler import cosine_lr

    cfg = OptimConfig(lr=1e-3, warmup=10, lr_scheduler="cosine")
    ours = lrs(cfg, 100)
    p = torch.nn.Parameter(torch.zeros(1))
    ref = cosine_lr(torch.optim.SGD([p], lr=1.0), 1e-3, 10, 100)
    assert all(approx(a, ref(k)) for k, a in enumerate(ours))
    assert approx(ours[0], 1e-4) and approx(ours[9], 1e-3)  # warmup end is the peak
    assert approx(ours[55], 0.5e-3)  # half-way through the cosine
    assert 0 < ours[99] < 1e-6


def test_const_and_const_cooldown_match_open_clip_train():
    from open_clip_train.scheduler import const_lr, const_lr_cooldown

    p = torch.nn.Parameter(torch.zeros(1))
    ours = lrs(OptimConfig(lr=2e-3, warmup=5, lr_scheduler="const"), 40)
    ref = const_lr(torch.optim.SGD([p], lr=1.0), 2e-3, 5, 40)
    assert all(approx(a, ref(k)) for k, a in enumerate(ours))
    assert approx(ours[4], 2e-3) and approx(ours[39], 2e-3)

    cfg = OptimConfig(lr=2e-3, warmup=5, lr_scheduler="const-cooldown", epochs_cooldown=2, lr_cooldown_end=1e-4,
                      lr_cooldown_power=2.0)
    ours = lrs(cfg, 40, steps_per_epoch=10)
    ref = const_lr_cooldown(torch.optim.SGD([p], lr=1.0), 2e-3, 5, 40, 20, 2.0, 1e-4)
    assert all(approx(a, ref(k)) for k, a in enumerate(ours))
    assert approx(ours[19], 2e-3) and approx(ours[20], 2e-3)  # cooldown starts at step 20 = 40 - 2 epochs
    assert approx(ours[30], 1e-4 + (2e-3 - 1e-4) * 0.25)
    assert ours[21] < 2e-3 and ours[39] > 1e-4


def test_infinite_schedule_phases():
    cfg = OptimConfig(lr=1e-3, warmup=10, lr_scheduler="infinite", infinite_cooldown_steps=20,
                      infinite_constant_lr_frac=0.25, infinite_anneal_steps=10)
    ours = lrs(cfg, 100)
    assert approx(ours[0], 1e-4) and approx(ours[9], 1e-3)      # warmup
    assert approx(ours[10], 1e-3)                                  # cooldown starts at the peak
    assert approx(ours[20], 0.25e-3 + 0.75e-3 * 0.5)               # half-way down the cosine
    assert all(ours[k] > ours[k + 1] for k in range(10, 29))
    assert approx(ours[30], 0.25e-3) and approx(ours[89], 0.25e-3)  # constant
    assert approx(ours[90], 0.25e-3) and approx(ours[95], 0.125e-3)  # linear anneal over the last 10
    assert approx(ours[99], 0.025e-3)
    # without an anneal phase it stays constant to the end
    assert approx(lrs(OptimConfig(lr=1e-3, warmup=0, lr_scheduler="infinite", infinite_constant_lr_frac=0.5,
                                  infinite_cooldown_steps=4), 10)[-1], 0.5e-3)


@pytest.mark.parametrize("kind,extra", [
    ("cosine", {}), ("const", {}), ("const-cooldown", {"epochs_cooldown": 1}),
    ("infinite", {"infinite_cooldown_steps": 6, "infinite_anneal_steps": 5}),
])
def test_schedule_state_dict_round_trip(kind, extra):
    cfg = OptimConfig(lr=1e-3, warmup=3, lr_scheduler=kind, **extra)
    total, spe = 20, 8
    full = lrs(cfg, total, spe)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=total, steps_per_epoch=spe)
    for _ in range(11):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()
    torch.save(state_sched, "/dev/null")  # picklable (no lambdas inside)
    p2 = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.AdamW([p2], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg, total_steps=total, steps_per_epoch=spe)
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)
    resumed = []
    for _ in range(11, total):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert all(approx(a, b) for a, b in zip(resumed, full[11:]))


def test_schedule_that_does_not_fit_is_a_config_error():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    # a warmup longer than the run is allowed (smoke tests): the run is all warmup
    assert approx(lrs(OptimConfig(lr=1e-3, warmup=5, lr_scheduler="cosine"), 2)[-1], 0.4e-3)
    with pytest.raises(ConfigError):
        build_scheduler(opt, OptimConfig(warmup=10, lr_scheduler="infinite", infinite_cooldown_steps=30,
                                         infinite_anneal_steps=20), total_steps=50)
    with pytest.raises(ConfigError):
        build_scheduler(opt, OptimConfig(warmup=10, lr_scheduler="const-cooldown", epochs_cooldown=5),
                        total_steps=50, steps_per_epoch=10)


def test_a_restored_scheduler_aimed_at_another_total_follows_the_new_schedule_from_its_step():
    """A run saved at step 30 of a 50-step cosine, resumed where it holds 40 steps (another world size): the next
    step's lr, and every later one, is the 40-step schedule's at that step, ending at 0 on step 40 (without the
    re-aim the restored scheduler keeps the 50-step lambda it was built with)."""
    from vlp.train.optim import aim_scheduler, lr_multiplier

    cfg = OptimConfig(lr=1e-3, warmup=4, lr_scheduler="cosine")
    saved = build_scheduler(build_optimizer(torch.nn.Linear(3, 3), cfg), cfg, total_steps=50)
    for _ in range(30):
        saved.optimizer.step()
        saved.step()
    sched = build_scheduler(build_optimizer(torch.nn.Linear(3, 3), cfg), cfg, total_steps=50)
    sched.load_state_dict(saved.state_dict())
    sched.optimizer.load_state_dict(saved.optimizer.state_dict())
    aim_scheduler(sched, lr_multiplier(cfg, 40, 1))
    new = lr_multiplier(cfg, 40, 1)
    seen = []
    for k in range(30, 40):
        seen.append(sched.optimizer.param_groups[0]["lr"])
        assert sched.get_last_lr()[0] == seen[-1]
        sched.optimizer.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * new(k) for k in range(30, 40)])
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
