"""The end-of-step check every rank agrees on: is the step finite, has anyone been asked to stop, and does
every rank have another step's batches?

A checked step runs one all-reduce carrying the four flags: the loss and the gradient norm must be finite, and a
stop signal that reached any rank stops every rank, so no rank raises or exits while the others wait in a
collective; and an epoch that ended on one rank (its data ran out early, see `vlp.train.feed`) ends on all. The
gradient norm is the one `--grad-clip-norm` computes anyway, else one fused `get_total_norm` pass
(vlp.compat.total_norm); under fp16 the gradient scaler already skips steps with inf/NaN gradients, so only the
loss is checked there.

Reading the flags on the host waits for the device to finish the step, so the next step cannot be queued behind
it. `--check-every N` (`PendingChecks`) reads them every N steps only: in between, each step's finiteness is
accumulated on the device without a sync (and without a gradient norm unless clipping computes one: a non-finite
gradient shows as a non-finite loss one step later), and the stop/more flags, host values, are agreed over a gloo
group (`vlp.distributed.any_on_host`) that does not wait for the device. Every save reads the pending flags
first, and the checkpointer checks the weights exactly, so no checkpoint holds a non-finite value; a non-finite
step is found up to N-1 steps late.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from vlp.compat import total_norm


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says why and where its state was saved."""


@dataclass
class Verdict:
    problem: Optional[str]  # "loss is nan", "gradient norm is inf", ... (None: the step is finite on every rank)
    stop: bool  # a stop signal reached some rank
    more: bool = True  # every rank has the next step's batches
    at: Optional[int] = None  # the step the problem happened at, when found later (--check-every)


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients (one fused pass); 0 when no parameter has one."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return total_norm(grads) if grads else torch.zeros(())


def checked_grad_norm(accelerator, model, clip: Optional[float]) -> Optional[torch.Tensor]:
    """Clip to `clip` if set; the gradient norm to check, or None under fp16's scaler (it skips bad steps)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), clip) if clip else None
    if accelerator.scaler is not None:
        return None
    norm = norm if norm is not None else grad_norm(model.parameters())
    # sharded (--fsdp) gradients give a DTensor norm (collective: every rank is here)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any (one collective)."""
    from vlp.distributed import reduce_mean

    return reduce_mean(torch.tensor(float(flag), device=device)).item() > 0


def all_ranks(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on all (one collective)."""
    return not any_rank(not flag, device)


def agree(loss: torch.Tensor, norm: Optional[torch.Tensor], stop: bool, more: bool = True) -> Verdict:
    """Combine this rank's loss, gradient norm (None: not checked), stop flag and whether it has the next step's
    batches with every other rank's."""
    from vlp.distributed import reduce_mean

    norm_ok = torch.isfinite(norm).float().to(loss.device) if norm is not None else torch.ones((), device=loss.device)
    flags = torch.stack([torch.isfinite(loss).float(), norm_ok, torch.tensor(float(stop), device=loss.device),
                         torch.tensor(float(more), device=loss.device)])
    loss_ok, grads_ok, stop_any, more_all = reduce_mean(flags).tolist()  # the step's one collective and one sync
    problem = None
    if loss_ok < 1:
        problem = f"loss is {loss.item()}" if not torch.isfinite(loss) else "loss is not finite on another rank"
    elif grads_ok < 1:
        problem = f"gradient norm is {norm.item()}" if norm is not None and not torch.isfinite(norm) \
            else "gradient norm is not finite on another rank"
    return Verdict(problem, stop_any > 0, more_all >= 1)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every element of every floating tensor is finite (exact, for the state about to be saved)."""
    # a sharded (DTensor) parameter is checked on this rank's shard; callers combine the ranks' answers
    tensors = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
    # A sum is finite only if every element is (inf and nan propagate): one fast pass, 20x quicker than
    # isfinite().all(); only a sum that overflows (or a real inf/nan) takes the element-wise check.
    return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
               for t in tensors if t.is_floating_point())


def agree_on_host(stop: bool, more: bool) -> Verdict:
    """The stop and more flags of an unchecked step, agreed by every rank without waiting for the device."""
    from vlp.distributed import any_on_host

    stop_any, less_any = any_on_host([stop, not more])
    return Verdict(None, stop_any, not less_any)


class PendingChecks:
    """Finiteness of the steps since the last read, accumulated on the device (no host sync): [loss not finite,
    gradient norm not finite, first such step]. `read()` agrees over ranks and syncs once."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._flags: Optional[torch.Tensor] = None

    @property
    def pending(self) -> bool:
        return self._flags is not None

    def record(self, step: int, loss: torch.Tensor, norm: Optional[torch.Tensor]) -> None:
        bad_loss = (~torch.isfinite(loss.detach().float())).float()
        bad_norm = (~torch.isfinite(norm.float())).float().to(bad_loss.device) if norm is not None else \
            torch.zeros_like(bad_loss)
        now = torch.stack([bad_loss, bad_norm, torch.zeros_like(bad_loss)])
        if self._flags is None:
            self._flags = torch.zeros(3, device=bad_loss.device)
        first_bad = (self._flags[2] == 0) & (now[:2].sum() > 0)
        now[2] = torch.where(first_bad, torch.full_like(bad_loss, float(step)), self._flags[2])
        self._flags = torch.maximum(self._flags, now)

    def read(self) -> Optional[tuple[str, int]]:
        """(problem, step) of the first non-finite step since the last read on any rank, or None (collective)."""
        if self._flags is None:
            return None
        import torch.distributed as dist

        from vlp.distributed import is_initialized

        flags, self._flags = self._flags, None
        if is_initialized() and dist.get_world_size() > 1:
            flags = flags.clone()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_norm, step = flags.tolist()   # the one sync of the last N steps
        if not bad_loss and not bad_norm:
            return None
        return ("loss is not finite" if bad_loss else "gradient norm is not finite"), int(step)
