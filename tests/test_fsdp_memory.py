"""What FSDP2 holds per rank, measured at 2 gloo ranks: gradients between accumulation micro-steps (sharded by
default, the whole model's with --fsdp-accum-no-sync), and parameters after the forward of towers that are not
open_clip's (timm's and Hugging Face's blocks are shard units, not part of the never-resharded root)."""
from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.conftest import write_tiny_bert


def _live_bytes() -> int:
    """Bytes of every live CPU tensor's storage (each storage once), the gradients of parameters included (autograd
    creates them in C++: they have no Python object of their own until read): what this process holds in tensors."""
    from torch.distributed.tensor import DTensor

    storages = {}
    for o in gc.get_objects():
        if not isinstance(o, torch.Tensor):
            continue
        found = [o]
        if o.is_leaf and o.requires_grad and o.grad is not None:
            found.append(o.grad)
        for t in found:
            t = t.to_local() if isinstance(t, DTensor) else t
            if t.device.type == "cpu" and not isinstance(t, DTensor):
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _param_bytes_now(model: torch.nn.Module) -> int:
    """The parameter bytes this rank holds now: a sharded (DTensor) parameter's local shard, an unsharded one whole
    (FSDP2 swaps a unit's parameters to plain tensors while it is gathered)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.untyped_storage().nbytes() if local.numel() else 0
    return total


def _worker(rank: int, world: int, port: int, cfgs: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from vlp.config import LossConfig
    from vlp.losses import build_loss
    from vlp.models import create_model
    from vlp.train import sharding
    from vlp.train.parallelize import gradient_sync_off
    from vlp.train.step import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cpu, out = torch.device("cpu"), {}
    loss_fn = build_loss(LossConfig(), rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)

    def batches(n, vocab=900, size=32):
        return [(torch.randn(4, 3, size, size, generator=g), torch.randint(1, vocab, (4, 16), generator=g))
                for _ in range(n)]

    # --- gradients held between micro-steps (--accum-freq 2), both modes
    micro = batches(2)
    for no_sync in (False, True):
        torch.manual_seed(0)
        model = create_model(cfgs["wide"]).model
        out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        model = sharding.shard_model(model, "full", cpu, "fp32", accum_no_sync=no_sync)
        held = []

        @contextmanager
        def micro_step():   # around each micro-step but the last: measure what it leaves behind
            with gradient_sync_off(None, model):
                yield
            gc.collect()
            held.append(_live_bytes() - before)

        gc.collect()
        before = _live_bytes()
        train_step(model, micro, loss_fn, no_sync=micro_step)
        out[f"grad_bytes_no_sync={no_sync}"] = held[0]
        del model
        gc.collect()

    # --- parameters held after the forward: timm and Hugging Face towers
    for name in ("timm", "hf"):
        torch.manual_seed(0)
        model = create_model(cfgs[name]).model
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        model = sharding.shard_model(model, "full", cpu, "fp32")
        # the tiny BERT's vocabulary is 20 words; timm's ViT-Ti/16 takes its 224 px
        images, texts = batches(1, vocab=15, size=224 if name == "timm" else 32)[0]
        model(images, texts)
        out[f"{name}_after_forward"] = _param_bytes_now(model) / full
        out[f"{name}_units"] = len(sharding._blocks(model))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import torch.multiprocessing as mp

    from tests.test_train_distributed import _free_port

    out = tmp_path_factory.mktemp("fsdp_mem")
    bert = write_tiny_bert(out, layers=4)
    cfgs = {
        "wide": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 128, "heads": 2, "layers": 4}},
        "timm": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                                 "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                 "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2}},
        "hf": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
               "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "context_length": 16,
                            "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}},
    }
    paths = {}
    for name, c in cfgs.items():
        paths[name] = str(out / f"fsdp-{name}.json")
        Path(paths[name]).write_text(json.dumps(c))
    mp.start_processes(_worker, args=(2, _free_port(), paths, str(out)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    print(json.dumps(ranks, indent=1))
    return ranks


@pytest.mark.slow   # 2 spawned ranks building 4 models: ~1-2 min on 2 loaded cores
def test_accumulation_keeps_gradients_sharded_unless_asked(measured):
    for r in measured:
        full = r["param_bytes"]   # float32 parameters: their gradients take as many bytes
        sharded, no_sync = r["grad_bytes_no_sync=False"], r["grad_bytes_no_sync=True"]
        assert sharded <= 0.6 * full, (sharded, full)         # about half the gradients on each of 2 ranks
        assert no_sync >= 0.9 * full, (no_sync, full)         # every block's whole float32 gradient, as DDP


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["timm", "hf"])
def test_timm_and_hf_blocks_are_shard_units(measured, tower):
    for r in measured:
        assert r[f"{tower}_units"] >= 4
        # after the forward only the root (embeddings, norms, projections) stays gathered: about 1/world per rank
        assert r[f"{tower}_after_forward"] <= 0.6, r[f"{tower}_after_forward"]
