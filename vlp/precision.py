"""Precision names with open_clip's meanings, shared by train.py and eval_zeroshot.py.

| name | open_clip_train's meaning | how vlp runs it |
|---|---|---|
| `amp` (open_clip's default) | fp32 weights, fp16 autocast, grad scaler | accelerate `fp16` |
| `amp_bf16`, `amp_bfloat16` | fp32 weights, bf16 autocast | accelerate `bf16` |
| `bf16`, `fp16` | Linear/Conv/attention weights cast to 16 bit, norms and logit scale fp32, no autocast | open_clip's `convert_weights_to_lp` |
| `pure_bf16`, `pure_fp16` | the whole model cast to 16 bit | `model.to(dtype)` |
| `fp32` | fp32 | fp32 |

vlp adds `auto` (its default): `amp` on CUDA (`amp_bf16` under `--fsdp`, whose shards are gathered in bf16 and
reduced in float32, and where fp16's grad scaler would have to agree across shards), `fp32` on CPU, where 16-bit
arithmetic is slower than fp32 on most processors (vlp-tiny on 2 cores: 9 samples/s in bf16 autocast, 66 in fp32).
The resolved name is the run's one precision policy: training, the in-loop evaluation and (through the checkpoint's
config) `vlp eval` of its checkpoints use it.
"""
from __future__ import annotations

from typing import Optional

import torch

NAMES = ("auto", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")


FSDP_NAMES = ("auto", "fp32", "amp_bf16", "amp_bfloat16")   # what --fsdp can run


def resolve(name: str, device, fsdp: bool = False) -> str:
    """`auto` -> `amp` on CUDA (`amp_bf16` under --fsdp), `fp32` elsewhere; other names unchanged."""
    if name != "auto":
        return name
    if torch.device(device).type != "cuda":
        return "fp32"
    return "amp_bf16" if fsdp else "amp"


def fsdp_refusal(name: str) -> Optional[str]:
    """Why --fsdp cannot run under --precision `name` (None: it can)."""
    if name in FSDP_NAMES:
        return None
    return (f"--fsdp runs in fp32 or amp_bf16 (bf16 autocast; auto picks it on CUDA), not --precision {name}: "
            f"fp16 autocast needs a grad scaler that agrees across shards, and cast weights mix dtypes in a shard unit")


def accelerate_mixed_precision(name: str) -> str:
    """accelerate's `mixed_precision` for a (resolved) name: autocast only for the amp names."""
    return {"amp": "fp16", "amp_bf16": "bf16", "amp_bfloat16": "bf16"}.get(name, "no")


def autocast_dtype(name: str) -> Optional[torch.dtype]:
    return {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}.get(name)


def weight_dtype(name: str) -> Optional[torch.dtype]:
    """The 16-bit type a name casts weights to (None: weights stay fp32)."""
    return {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16,
            "fp16": torch.float16, "pure_fp16": torch.float16}.get(name)


def compute_dtype(name: str) -> torch.dtype:
    """The dtype the model computes in: autocast's, else the weights', else float32."""
    return autocast_dtype(name) or weight_dtype(name) or torch.float32


def input_dtype(name: str) -> Optional[torch.dtype]:
    """What images are cast to before the model (open_clip's `get_input_dtype`)."""
    return weight_dtype(name)


def cast_model(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Cast weights as open_clip does for `bf16`/`fp16` (matmul weights only) and `pure_*` (everything)."""
    dtype = weight_dtype(name)
    if dtype is None:
        return model
    if name.startswith("pure_"):
        return model.to(dtype)
    from open_clip.model import convert_weights_to_lp

    convert_weights_to_lp(model, dtype=dtype)
    return model


def is_16bit(name: str) -> bool:
    return name not in ("fp32", "auto")


def cpu_warning(name: str, device) -> Optional[str]:
    """One line when a 16-bit precision is asked for on CPU (slow, or for `amp` not applied at all)."""
    if torch.device(device).type != "cpu" or not is_16bit(name):
        return None
    if name == "amp":
        return ("--precision amp on CPU: accelerate applies no fp16 autocast on CPU, so this run is fp32; "
                "say --precision fp32 (or auto)")
    return (f"--precision {name} on CPU: 16-bit arithmetic is slower than fp32 on CPUs without native bf16 "
            "matrix units; --precision fp32 (or auto) is the faster choice there")


def for_eval(asked: str, trained: Optional[str]) -> str:
    """The precision a checkpoint is scored in: the asked one, or under `auto` the precision it was trained in (as
    the checkpoint records it, resolved on the training machine): a model trained in bf16 is not scored under fp16
    autocast, where its activations can overflow. `auto` stays when the training precision is unknown (open_clip
    checkpoints, random weights): the evaluator's own choice, fp16 autocast on CUDA as CLIP_benchmark's --amp."""
    if asked != "auto" or trained not in NAMES or trained == "auto":
        return asked
    return trained


def eval_autocast(name: str, device):
    """The autocast context scoring runs under: the amp dtype, or for cast weights their dtype (so fp32
    inputs meet 16-bit weights); a null context for fp32."""
    import contextlib

    dtype = autocast_dtype(name) or weight_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
