"""A step checkpoint as torch.distributed.checkpoint (DCP) writes it, committed by vlp's main file.

    checkpoints/step_00000100.dcp/   every rank's files (__R_0.distcp), DCP's .metadata, manifest.json
    checkpoints/step_00000100.pt     the model alone (open_clip's `pretrained=` file) + which folder holds the rest

Every rank writes what it holds into `.step_N.dcp.tmp-PID-TOKEN/` (PID: the main process's; replicated tensors
once, FSDP2 shards each by its owner), hashing as it writes. Then the main process alone lists the digests in
the folder's manifest, reads the model back into one consolidated file, renames the folder to `step_N.dcp` and
writes `step_N.pt` atomically: that rename commits the checkpoint (a folder without its .pt is a leftover,
swept). The other ranks wait for that through a CPU (gloo) group whose timeout is `MAIN_WORK_TIMEOUT`, never
inside a collective bounded by --dist-timeout.

A background save (`background=True`) stages the state to CPU memory (DCP's async_save), then writes and commits
in a thread while training goes on; at most one is in flight (the next save, sync or not, waits for it) and its
outcome is reported by `poll()`: a failed one leaves the previous checkpoint in place.
"""
from __future__ import annotations

import os
import secrets
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from vlp.runtime import checkpoint as ckpt
from vlp.runtime import dcp_files as F
from vlp.runtime.atomic_file import _DISK_FULL, CheckpointWriteError, _fsync_dir, _write_failure


def dcp_name(step: int) -> str:
    return f"step_{step:08d}.dcp"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _gather(group, obj) -> list:
    import torch.distributed as dist

    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _from_main(group, value):
    """Rank 0's `value` on every rank of `group` (waits with the group's own timeout)."""
    import torch.distributed as dist

    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class DcpSaver:
    """Writes a run's step checkpoints through DCP (every rank calls `save` at the same steps)."""

    def __init__(self, ckpt_dir: Path, keep: int, group, say: Callable[[str], None] = print):
        """`group`: a CPU (gloo) process group of every rank with a long timeout (None in a single process)."""
        self.dir, self.keep, self.group, self.say = ckpt_dir, keep, group, say
        self.rank = 0 if group is None else _rank()
        self.pending: Optional[tuple[int, Future]] = None
        self.failed: Optional[int] = None   # the step of the last background save that failed
        self.size = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlp-ckpt")

    def save(self, step: int, state: dict, main_state: dict, background: bool = False) -> Optional[Path]:
        """Write `state` (every rank's DCP state dict) as checkpoint `step`; `main_state` (rank 0's: config,
        identity, ...) goes into the main file with the consolidated model. Sync: returns the committed .pt on
        rank 0 (None elsewhere), or raises CheckpointWriteError (one line, on every rank). Background: returns
        None once the state is staged; `poll()` reports the outcome."""
        self.wait()
        self.size = ckpt.state_bytes(state)   # this rank's share, at most: named when a full disk stops it
        tmp = self.dir / _from_main(self.group, f".{dcp_name(step)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        writer = F.hashing_writer(tmp)
        if not background:
            return self._finish(step, tmp, writer, self._write(state, writer), main_state)
        import torch.distributed.checkpoint as dcp

        try:
            written = dcp.async_save(state, storage_writer=writer, process_group=self.group,
                                     no_dist=self.group is None)
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            written = Future()
            written.set_exception(e if isinstance(e, Exception) else RuntimeError(F.failure_line(e)))

        def rest() -> Optional[Path]:
            try:
                written.result()
                error = None
            except BaseException as e:  # noqa: BLE001
                error = self._line(e, writer)
            return self._finish(step, tmp, writer, error, main_state)

        self.pending = (step, self._thread.submit(rest))
        return None

    def _write(self, state: dict, writer) -> Optional[str]:
        import torch.distributed.checkpoint as dcp

        try:
            dcp.save(state, storage_writer=writer, process_group=self.group, no_dist=self.group is None)
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            return self._line(e, writer)
        return None

    def _line(self, e: BaseException, writer) -> str:
        """One line for a failed write: this rank's own OSError when it had one (a full disk: the bytes free),
        else the first failing rank's message as DCP passed it on."""
        failures = getattr(e, "failures", None)   # DCP's CheckpointException: {rank: (exception, trace)}
        if writer.fs.error is not None:
            rank, exc = self.rank, writer.fs.error
            exc.filename = exc.filename or writer.fs.error_file
        elif failures:
            rank, (exc, _) = sorted(failures.items(), key=lambda kv: kv[0])[0]
        else:
            rank, exc = self.rank, e
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            where = Path(writer.path) / Path(exc.filename or "its share").name
            return f"rank {rank}: {_write_failure(where, exc, self.size if rank == self.rank else 0)}"
        return f"rank {rank}: {F.failure_line(exc)}"

    def _finish(self, step: int, tmp: Path, writer, error: Optional[str], main_state: dict) -> Optional[Path]:
        """Every rank: learn every rank's digests and errors; rank 0 commits (or removes the folder); all learn
        the outcome from rank 0 over the long-timeout group."""
        shares = _gather(self.group, (error, writer.fs.error is not None, writer.digests))
        errors = [e for e, own, _ in shares if e and own] + [e for e, own, _ in shares if e and not own]
        outcome = None
        if self.rank == 0:
            try:
                if errors:
                    raise CheckpointWriteError(errors[0])
                digests = {name: d for _, _, share in shares for name, d in share.items()}
                outcome = ("ok", str(self._commit(step, tmp, digests, main_state)))
            except Exception as e:  # noqa: BLE001 - told to every rank, raised on every rank
                shutil.rmtree(tmp, ignore_errors=True)
                outcome = ("error", str(e) if isinstance(e, CheckpointWriteError) else f"rank 0: {F.failure_line(e)}")
        kind, value = _from_main(self.group, outcome)
        if kind == "error":
            raise CheckpointWriteError(f"checkpoint of step {step} not saved: {value}")
        return Path(value) if self.rank == 0 else None

    def _commit(self, step: int, tmp: Path, digests: dict, main_state: dict) -> Path:
        """Rank 0: manifest, consolidated model, folder renamed, main file written (the commit), old ones pruned."""
        manifest_sha = F.write_manifest(tmp, digests)
        scalars = set(main_state.get("fsdp_scalars") or ())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # DCP's note that it reads without a process group
            model = {k[len("model."):]: v for k, v in F.read_entries(tmp, lambda k: k.startswith("model.")).items()}
        model = {k: (v.reshape(()) if k in scalars else v) for k, v in model.items()}
        final = self.dir / dcp_name(step)
        if final.exists():   # left by a save of this step that was not committed, or is re-done
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        return ckpt.save_checkpoint(self.dir, step, {**main_state, "model": model, "state_dict": model,  # (stored once)
                                                     "dcp": final.name, "manifest_sha256": manifest_sha}, self.keep)

    def wait(self) -> None:
        """Let the background save in flight finish (every rank); its failure is reported, not raised."""
        self.poll(block=True)

    def poll(self, block: bool = False) -> None:
        """Report a finished background save: its failure as one line (the previous checkpoint stays)."""
        if self.pending is None or not (block or self.pending[1].done()):
            return
        step, done = self.pending
        self.pending = None
        try:
            done.result()
        except CheckpointWriteError as e:
            self.failed = step
            if self.rank == 0:
                self.say(f"warning: {e} (written in the background); the previous checkpoint is kept")

    def close(self) -> None:
        self.wait()
        self._thread.shutdown(wait=True)
