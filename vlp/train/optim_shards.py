"""An `--fsdp` run's optimiser state as each rank holds it, for checkpoints that each rank writes and reads
itself: no gather of the optimiser (two thirds of an AdamW training state) onto one process.

A rank's share is torch.distributed.checkpoint's sharded optimiser state dict (keyed by parameter name) with
each DTensor replaced by its local tensor (weights_only-safe); on resume the local tensors become DTensors
again, laid out like the parameters they belong to. A share fits only the same number of processes (the
checkpointer checks that first).
"""
from __future__ import annotations

import torch


def local_state(model: torch.nn.Module, optimizer) -> dict:
    """This rank's optimiser state: {"state": {name: {key: tensor}}, "param_groups": [...], "sharded": [[name,
    key], ...] (which tensors were DTensor shards)}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    from vlp.train.sharding import _plain_optimizer, state_dict_options

    full = get_optimizer_state_dict(model, _plain_optimizer(optimizer), options=state_dict_options(full=False))
    state, sharded = {}, []
    for name, entry in full["state"].items():
        state[name] = {}
        for key, value in entry.items():
            if isinstance(value, DTensor):
                sharded.append([name, key])
                value = value.to_local()
            state[name][key] = value
    return {"state": state, "param_groups": full["param_groups"], "sharded": sharded}


def load_local_state(model: torch.nn.Module, optimizer, share: dict) -> None:
    """Put back what `local_state` returned on this rank (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    from vlp.train.sharding import _plain_optimizer, state_dict_options

    params = dict(model.named_parameters())
    state = {name: dict(entry) for name, entry in share["state"].items()}
    for name, key in share["sharded"]:
        p = params[name]
        state[name][key] = DTensor.from_local(state[name][key].to(p.device), p.device_mesh, p.placements,
                                              shape=p.shape, stride=p.stride())
    set_optimizer_state_dict(model, _plain_optimizer(optimizer), {"state": state, "param_groups": share["param_groups"]},
                             options=state_dict_options(full=False))
