"""One rank of a checkpoint test, run by torchrun (or plain python for one rank): the run's real pieces (accelerate,
the micro model, AdamW, the scheduler, the training loader, DDP or FSDP2 on gloo) saved or restored through
`vlp.train.checkpointer.Checkpointer`.

    python -m torch.distributed.run --nproc_per_node N tests/ckpt_ranks.py ACTION CKPT_DIR MODEL_JSON SHARDS FSDP OUT

ACTION: `save` / `save-v1` (3 steps, then save step 3; OUT gets the gathered model and optimiser state as saved),
`load` (restore the newest checkpoint; OUT gets the gathered state as loaded, the step and each rank's loader
state), `full-disk` (as save, with a per-file size limit on the last rank: every rank's one line in OUT.rankR).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

import torch


def build(model_json: str, shards: str, fsdp: bool, run_dir: Path, workers: int = 2):
    from vlp.config import Config
    from vlp.data.pipeline import build_train_loader
    from vlp.models import create_model
    from vlp.train.checkpointer import Checkpointer
    from vlp.train.loop import make_accelerator
    from vlp.train.run_log import RunPaths
    from vlp.train.trainer import Trainer

    cfg = Config()
    cfg.model.model, cfg.run.precision, cfg.data.batch_size = model_json, "fp32", 4
    cfg.data.train_data, cfg.data.workers, cfg.run.keep_checkpoints = shards, workers, 5
    cfg.model.fsdp = fsdp
    acc = make_accelerator(cfg, RunPaths(run_dir))
    torch.manual_seed(0)
    bundle = create_model(model_json)
    trainer = Trainer(cfg, acc, bundle.model, total_steps=100, steps_per_epoch=10, precision="fp32")
    model, net, optimizer, scheduler = trainer.model, trainer.net, trainer.optimizer, trainer.scheduler
    loader = build_train_loader(cfg.data, bundle.preprocess_train, bundle.tokenizer, rank=acc.process_index,
                                world_size=acc.num_processes, seed=0)
    cp = Checkpointer(run_dir / "checkpoints", acc, net, optimizer, scheduler, loader, cfg,
                      {"model_name": bundle.model_name, "model_cfg": json.dumps(bundle.model_cfg), "tokenizer": None})
    return acc, model, net, optimizer, scheduler, cp


def train_steps(model, optimizer, scheduler, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(4, 3, 32, 32, generator=g)
        texts = torch.randint(0, 400, (4, 16), generator=g)
        out = model(images, texts)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def gathered(net, optimizer) -> dict:
    """The full model and optimiser state (every rank takes part), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from vlp.train import sharding

    model, optim = get_state_dict(net, sharding._plain_optimizer(optimizer),
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": {k: v.reshape(-1).clone() for k, v in model.items()},   # (copies: training goes on)
            "optim": {f"{n}/{k}": v.reshape(-1).clone() if torch.is_tensor(v) else v
                      for n, e in optim.get("state", {}).items() for k, v in e.items()}}


def main() -> None:
    action, ckpt_dir, model_json, shards, fsdp, out = sys.argv[1:7]
    torch.set_num_threads(1)
    workers = int(sys.argv[7]) if len(sys.argv) > 7 else 2
    run_dir = Path(ckpt_dir).parent
    acc, model, net, optimizer, scheduler, cp = build(model_json, shards, fsdp == "1", run_dir, workers)
    rank, world = acc.process_index, acc.num_processes
    if action in ("save", "full-disk"):
        train_steps(model, optimizer, scheduler, 3)
        if action == "full-disk":
            cp.save(2, 0)   # the previous checkpoint, written in full
            if rank == world - 1:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
            try:
                cp.save(3, 0)
                line = "saved"
            except Exception as e:  # noqa: BLE001 - the one line every rank gets is the result
                line = f"{type(e).__name__}: {e}"
            Path(f"{out}.rank{rank}").write_text(line)
            return
        state = gathered(net, optimizer)
        cp.save(3, 0)
    elif action == "save-v1":   # vlp's earlier writer (the format a run saved before DCP)
        from vlp.train.checkpoint_v1 import save_v1

        train_steps(model, optimizer, scheduler, 3)
        state = gathered(net, optimizer)
        save_v1(cp, 3, 0)
    else:
        from vlp.runtime import checkpoint as ckpt

        path = ckpt.resolve_resume("latest", Path(ckpt_dir))
        step, epoch, loader_state = cp.restore(path)
        state = gathered(net, optimizer)
        state.update(step=step, loader=loader_state, world=world)
        train_steps(model, optimizer, scheduler, 2)   # training goes on from the restored state
        cp.save(step + 2, epoch)
    if rank == 0:
        torch.save(state, out)
    cp.close()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
