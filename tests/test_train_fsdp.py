"""`--fsdp` (FSDP2 fully_shard) under torchrun with 2 CPU processes (gloo): it trains as DDP does, resumes
exactly from its gathered checkpoints, evaluates in the loop (every rank takes part) and exports an
open_clip folder holding the gathered weights."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_train_distributed import _torchrun
from tests.test_train_loop import _losses
from vlp.config import ConfigError


def _common(demo_data, micro_model_json):
    return ["--train-data", demo_data["train_data"], "--model", micro_model_json, "--batch-size", "16",
            "--workers", "1", "--lr-scheduler", "const", "--warmup", "0", "--lr", "1e-3", "--log-every", "1",
            "--save-every", "2", "--report-to", "none", "--no-progress", "--precision", "fp32",
            "--loss", "siglip", "--grad-clip-norm", "1.0"]


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_exactly(demo_data, micro_model_json, tmp_path):
    common = _common(demo_data, micro_model_json)
    _torchrun([*common, "--name", "ddp", "--max-steps", "4"], tmp_path)
    _torchrun([*common, "--fsdp", "--name", "ref", "--max-steps", "4", "--eval-data", demo_data["eval_data"][0]],
              tmp_path)
    _torchrun([*common, "--fsdp", "--name", "split", "--max-steps", "2"], tmp_path)
    _torchrun([*common, "--fsdp", "--name", "split", "--max-steps", "4", "--resume", "latest"], tmp_path)

    ddp, ref, split = (_losses(tmp_path / n) for n in ("ddp", "ref", "split"))
    assert sorted(ref) == sorted(split) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert ref[step] == pytest.approx(ddp[step], rel=1e-4), step  # sharded = replicated training
        assert split[step] == pytest.approx(ref[step], abs=1e-6), step  # step-exact resume

    # in-loop evaluation ran (every rank scored; rank 0 logged) and the checkpoint holds gathered weights
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("eval/") for row in rows for k in row)
    state = torch.load(tmp_path / "ref" / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert state["fsdp"] is True and state["model"]["logit_scale"].shape == torch.Size([])

    # the export is an ordinary open_clip folder with the same weights as the final checkpoint
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ref' / 'export'}")
    exported = model.state_dict()
    assert set(exported) == set(state["model"])
    for k, v in state["model"].items():
        torch.testing.assert_close(exported[k], v, msg=k)
    ddp_state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert set(ddp_state["model"]) == set(state["model"])


def test_fsdp_refusals(tmp_path):
    from vlp.train import sharding

    with pytest.raises(ConfigError, match="--fsdp runs in fp32 or amp_bf16"):
        sharding.shard_model(torch.nn.Linear(2, 2), "full", torch.device("cpu"), "amp")
    with pytest.raises(ConfigError, match="several processes"):
        sharding.shard_model(torch.nn.Linear(2, 2), "full", torch.device("cpu"), "fp32")
    from vlp.config import Config, validate

    cfg = Config()
    cfg.model.fsdp_sharding = "zero3"
    with pytest.raises(ConfigError, match="fsdp-sharding"):
        validate(cfg)


# ------------------------------------------------ FSDP2 communication and in-loop evaluation, 2 spawned gloo ranks
def _folder_set(base) -> str:
    """Two classes of 4 images, as a folder eval set named after the folder."""
    import random

    from vlp.data import demo_world as W

    rng = random.Random(0)
    for c in ("red", "blue"):
        (base / c).mkdir(parents=True)
        for i in range(4):
            (base / c / f"{i}.png").write_bytes(W.encode_png(W.render(W.random_scene(rng), 32, rng)))
    return f"{base}?classnames=folders&templates=simple"


def _fsdp_worker(rank: int, world: int, port: int, model_json: str, sets: list, out_dir: str) -> None:
    import copy
    import os
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from torch.distributed.tensor.debug import CommDebugMode

    from vlp.config import Config, LossConfig
    from vlp.eval.encode import _supports_prefix_sharing
    from vlp.losses import build_loss
    from vlp.models import create_model
    from vlp.train import sharding
    from vlp.train.inloop_eval import InLoopEval, open_sets
    from vlp.train.loop import make_accelerator
    from vlp.train.run_log import MetricsLog, RunPaths
    from vlp.train.parallelize import gradient_sync_off
    from vlp.train.step import train_step

    cfg = Config()
    cfg.model.model, cfg.run.eval_data, cfg.data.batch_size, cfg.run.precision = model_json, sets, 4, "fp32"
    out_dir = Path(out_dir)
    acc = make_accelerator(cfg, RunPaths(out_dir / f"run{rank}"))
    out = {}

    # --- evaluation under --fsdp: split across ranks, failures agreed on, the same figures as unsharded
    torch.manual_seed(0)
    bundle = create_model(model_json)
    reference = copy.deepcopy(bundle.model)
    net = sharding.shard_model(bundle.model, "full", acc.device, "fp32")
    rows = []
    net.visual.register_forward_hook(lambda m, args, y: rows.append(args[0].shape[0]))
    if rank == 1:  # a fault that arrives on one rank only: its first image batch runs out of memory
        raised = []

        def oom(m, args):
            if not raised:
                raised.append(1)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected on rank 1)")
        net.visual.register_forward_pre_hook(oom)
    with sharding.gathered(net):
        out["prefix_sharing"] = _supports_prefix_sharing(net)
    out["eval"] = InLoopEval(cfg, bundle, acc, MetricsLog(out_dir / "metrics.jsonl", acc, rank == 0),
                             open_sets(sets))(net, 1)
    out["images_encoded"] = sum(rows)
    print(f"rank {rank}: encoded {sum(rows)} images", flush=True)
    if rank == 0:
        from vlp.eval import evaluate

        out["reference"] = evaluate(reference, bundle.tokenizer, bundle.preprocess_val, sets[1:], batch_size=64,
                                    amp=False, feature_cache=False)[0]["metrics"]

    # --- FSDP2 communication: bf16 all-gathers, float32 reductions, one reduce-scatter per step under --accum-freq
    # with --fsdp-accum-no-sync (the default reduce-scatters every micro-step: tests/test_fsdp_memory.py)
    torch.manual_seed(0)
    model = sharding.shard_model(create_model(model_json).model, "full", acc.device, "amp_bf16", accum_no_sync=True)
    dtypes = []
    sharding._blocks(model)[0].mlp.c_fc.register_forward_pre_hook(lambda m, a: dtypes.append(m.weight.dtype))
    g = torch.Generator().manual_seed(rank)
    micro = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 400, (4, 16), generator=g)) for _ in range(2)]
    loss_fn = build_loss(LossConfig(), rank=rank, world_size=world)
    out["reduce_scatters"] = {}
    for accum in (1, 2):
        with CommDebugMode() as comm:
            train_step(model, micro[:accum], loss_fn, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                       no_sync=lambda: gradient_sync_off(acc, model))
        out["reduce_scatters"][accum] = sum(n for op, n in comm.get_comm_counts().items() if "reduce_scatter" in str(op))
        model.zero_grad(set_to_none=True)
    with CommDebugMode() as comm:  # accelerate's no_sync, what the loop used: nothing for a model it did not wrap
        train_step(model, micro, loss_fn, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                   no_sync=lambda: acc.no_sync(model))
    out["reduce_scatters"]["accelerate_no_sync"] = sum(
        n for op, n in comm.get_comm_counts().items() if "reduce_scatter" in str(op))
    out["gathered_dtypes"] = sorted({str(d) for d in dtypes})
    print(f"rank {rank}: reduce-scatters {out['reduce_scatters']}, gathered {out['gathered_dtypes']}", flush=True)
    out["shard_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    torch.save(out, out_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_ranks(demo_data, micro_model_json, tmp_path_factory):
    import torch.multiprocessing as mp

    from tests.test_train_distributed import _free_port

    out = tmp_path_factory.mktemp("fsdp")
    sets = [_folder_set(out / "first"), demo_data["eval_data"][0]]
    mp.start_processes(_fsdp_worker, args=(2, _free_port(), micro_model_json, sets, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_fsdp_eval_is_split_across_ranks_and_agrees_on_failures(fsdp_ranks):
    n_images = 8 + 80  # the first set's images and demo_colors' (each rank encoded all of them before)
    encoded = [r["images_encoded"] for r in fsdp_ranks]
    assert sum(encoded) <= n_images and max(encoded) <= n_images // 2, encoded
    ev, ref = fsdp_ranks[0]["eval"], fsdp_ranks[0]["reference"]
    # rank 1's failure ended the first set on both ranks (no rank left waiting in the other's gathers)
    assert "out of memory" in ev["eval/first/error"] and "(on rank 1)" in ev["eval/first/error"], ev
    for k, v in ref.items():  # the next set still scored, as the unsharded model scores it in one process
        if isinstance(v, float):
            assert ev[f"eval/wds/demo_colors/{k}"] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_prefix_sharing_text_encoder_recognises_fsdp2_classes(fsdp_ranks):
    assert all(r["prefix_sharing"] for r in fsdp_ranks)


def test_fsdp2_bf16_gathers_and_one_reduce_scatter_per_step(fsdp_ranks):
    for r in fsdp_ranks:
        assert r["gathered_dtypes"] == ["torch.bfloat16"]      # the blocks' weights travel in bf16
        assert r["shard_dtypes"] == ["torch.float32"]          # the sharded masters (and their gradients) stay fp32
        one, two = r["reduce_scatters"][1], r["reduce_scatters"][2]
        assert one >= 2 and two == one, r["reduce_scatters"]  # --accum-freq 2: the first micro-step does not reduce
        assert r["reduce_scatters"]["accelerate_no_sync"] == 2 * one  # the control: every micro-step reduced
