"""Checkpoint files of a run: written atomically, verified before use, found again (`--resume latest`).

A checkpoint's main file is `step_NNNNNNNN.pt`, one torch.save dict holding only weights_only-safe types
(tensors, numbers, strings, lists, dicts), so loading it never executes pickled code; open_clip loads it as
`pretrained=` (its `state_dict`: the model alone). It is written by `vlp.runtime.atomic_file`'s single atomic
writer and carries its SHA-256; `latest` names the newest. The training state beside it is a DCP folder
(`"dcp"`: `step_NNNNNNNN.dcp/`, see `vlp.runtime.dcp_checkpoint`) whose manifest's digest the main file records;
the earlier format listed each rank's optimiser share instead (`"parts"`: `step_NNNNNNNN.pt.partR-TOKEN`). The
main file's rename commits the set. A run resumes from the newest checkpoint that verifies; rank 0 alone
verifies while the other ranks wait through the long-timeout CPU group.
"""
from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vlp.config import ConfigError
from vlp.distributed import main_work_group
from vlp.runtime import peers
from vlp.runtime.atomic_file import (  # noqa: F401 - the writer's names, used through this module too
    CheckpointWriteError, atomic_torch_save, atomic_write_bytes, first_line, folder_write_error, state_bytes,
    stored_checksum, verify)

STEP_RE = re.compile(r"^step_(\d{8})\.pt$")
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def check(path: Path, parts: bool = True) -> bool:
    """verify(path) and the parts it lists, and refuse in one line what torch.load would fail on with a
    cryptic message: an unreadable path, a file that is no torch.save file (a text file), a truncated zip.
    True: checksum verified; False: a readable file without one (another tool's)."""
    try:
        if verify(path):
            state = _load(path) if parts else None
            if isinstance(state, dict) and state.get("dcp"):   # the rest of the state: a DCP folder beside it
                from vlp.runtime.dcp_files import verify_folder

                verify_folder(path.with_name(state["dcp"]), state.get("manifest_sha256", ""), str(path))
            listed = state.get("parts") if isinstance(state, dict) else None
            for name in listed or ():
                if not path.with_name(name).is_file():
                    raise ConfigError(f"checkpoint {path} is incomplete: {name}, written beside it by another "
                                      f"rank, is missing")
                check(path.with_name(name), parts=False)
            return True
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head.startswith(b"PK\x03\x04"):
            zipfile.ZipFile(path).close()  # reads the central directory, which a cut-off file lacks
        elif head[:1] != b"\x80":  # neither torch.save's zip nor its legacy pickle
            raise ConfigError(f"{path} is not a checkpoint: a torch.save file starts with a zip or pickle header, "
                              f"this one with {head!r}")
        return False
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except zipfile.BadZipFile as e:
        raise ConfigError(f"checkpoint {path} is truncated or damaged ({first_line(e)}): "
                          f"use an earlier checkpoint") from None


def on_main(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 of the default process group only (a plain call without one); its result, or its
    ConfigError as one line, on every rank. For reads one rank does for all (verifying a checkpoint): the others
    wait through `vlp.distributed.main_work_group` (CPU, long timeout), not a collective of --dist-timeout."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ConfigError as e:
            box = [("error", str(e))]
        except Exception as e:  # noqa: BLE001 - raised here after the others learn of it
            failure, box = e, [("error", f"rank 0: {type(e).__name__}: {first_line(e)}")]
    dist.broadcast_object_list(box, src=0, group=main_work_group())   # waits apart from --dist-timeout
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints in a folder, oldest first (temporary files are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found)


def part_name(step: int, token: str, rank: int) -> str:
    """The file holding rank `rank`'s share of checkpoint `step` in the save identified by `token`."""
    return f"{checkpoint_name(step)}.part{rank}-{token}"


def _folder(ckpt_dir: Path) -> None:
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(f"cannot create checkpoint folder {ckpt_dir}: {e.strerror}") from None


def save_part(ckpt_dir: Path, name: str, share: dict) -> None:
    """Write one rank's share of a checkpoint (before rank 0 commits the main file that lists it)."""
    _folder(ckpt_dir)
    atomic_torch_save(share, ckpt_dir / name)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int,
                    ready: Optional[Callable[[], Optional[str]]] = None) -> Path:
    """Write `state` as the checkpoint of `step`, point `latest` at it, keep only the newest `keep`.
    `state["parts"]`: names of files other ranks write beside it; `ready()` says (before the rename that
    commits the checkpoint) whether they were all written, or why not."""
    _folder(ckpt_dir)
    sweep(ckpt_dir, committing=state.get("dcp"))
    path = ckpt_dir / checkpoint_name(step)
    atomic_torch_save(state, path, ready=ready)
    atomic_write_bytes(ckpt_dir / LATEST, path.name.encode())
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    kept, listed = {p.name for _, p in list_checkpoints(ckpt_dir)}, set(state.get("parts") or ())
    for part in ckpt_dir.glob("*.pt.part*"):  # shares of deleted checkpoints, of saves that failed, of killed writers
        main = part.name.lstrip(".").split(".part")[0]
        dead_tmp = ".tmp-" in part.name and not writer_alive(part)
        if dead_tmp or main not in kept or (main == path.name and part.name not in listed):
            part.unlink(missing_ok=True)
    for folder in ckpt_dir.glob("step_*.dcp"):  # the DCP folders of deleted checkpoints
        if folder.name.removesuffix(".dcp") + ".pt" not in kept:
            shutil.rmtree(folder, ignore_errors=True)
    return path


def sweep(ckpt_dir: Path, committing: Optional[str] = None) -> None:
    """Remove what writers that were killed left: temporary files and DCP folders (`.NAME.tmp-PID[-TOKEN]`) whose
    process has ended, and DCP folders renamed but never committed by their main file."""
    for stale in ckpt_dir.glob(".step_*.tmp-*"):   # a live writer's stays
        if not writer_alive(stale):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for folder in ckpt_dir.glob("step_*.dcp"):
        if folder.name != committing and not (ckpt_dir / (folder.name.removesuffix(".dcp") + ".pt")).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def writer_alive(tmp: Path) -> bool:
    """Whether the process named in a temporary file's name (`.NAME.tmp-PID` or `.NAME.tmp-PID-TOKEN`) still runs
    (not this one)."""
    pid = tmp.name.rsplit(".tmp-", 1)[-1].split("-")[0]
    return pid.isdigit() and int(pid) != os.getpid() and peers.alive(int(pid))


def resolve_resume(resume: str, ckpt_dir: Path, say: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """`--resume latest` -> the newest checkpoint of this run that verifies (None if there is none yet): a
    damaged newer one is passed over, and `say` gets one line naming both. Else the given file (checked when
    loaded). Under several processes rank 0 alone reads the files and tells the others."""
    if resume == LATEST:
        path, note = on_main(lambda: _newest_intact(ckpt_dir))
        if note and say is not None:
            say(note)
        return path
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume: checkpoint not found: {resume}")
    return path


def _newest_intact(ckpt_dir: Path) -> tuple[Optional[Path], Optional[str]]:
    found = [p for _, p in reversed(list_checkpoints(ckpt_dir))]
    pointer = ckpt_dir / LATEST
    named = ckpt_dir / pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    if named in found:  # the newest written, normally found[0]
        found.remove(named)
        found.insert(0, named)
    damaged = []
    for path in found:
        try:
            check(path)
        except ConfigError as e:
            damaged.append(f"{path.name} {str(e).replace(f'checkpoint {path} ', '').replace(str(path), path.name)}")
            continue
        note = None
        if damaged:
            more = f" (and {len(damaged) - 1} more newer checkpoint(s) damaged)" if len(damaged) > 1 else ""
            note = (f"--resume latest: {damaged[0]}{more}; resuming from {path.name}, the newest checkpoint "
                    f"that verifies")
        return path, note
    if damaged:
        raise ConfigError(f"--resume latest: no checkpoint in {ckpt_dir} verifies: {'; '.join(damaged)}")
    return None, None


def load_state(path: Path, checked: bool = False, parts: bool = True) -> Any:
    """The one way vlp reads a checkpoint file: check it (its checksum; `checked`: done already, see
    `on_main`), then torch.load it memory-mapped (tensors read from the page cache as they are used, shared
    by the processes of a machine) without executing pickled code (resume, --pretrained and eval all come
    through here). `parts`: merge the optimiser shares other ranks wrote beside it (not needed for weights)."""
    path = Path(path)
    if not checked:
        check(path, parts=parts)
    state = _load(path)
    if parts and isinstance(state, dict) and state.get("parts") and not state.get("fsdp"):
        for name in state["parts"]:  # (an --fsdp run's parts are per-rank shards: each rank reads its own)
            state["optimizer"]["state"].update(read_part(path, name))
    return state


def read_part(path: Path, name: str) -> Any:
    """The optimiser share in part `name` of checkpoint `path` (checked with it)."""
    return _load(Path(path).with_name(name))["optimizer_state"]


def _load(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # a legacy (pickle) torch.save file cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing error
        raise ConfigError(f"cannot read checkpoint {path}: {first_line(e)}") from None


def loader_states(path: Path) -> list:
    """Every rank's loader position saved in checkpoint `path`, in rank order (either format)."""
    main = load_state(Path(path), parts=False)
    if not main.get("dcp"):
        return main["loader"]
    from vlp.runtime.dcp_files import from_bytes_tensor, read_entries

    found = read_entries(Path(path).with_name(main["dcp"]), lambda k: k.startswith("loader/rank"))
    return [from_bytes_tensor(found[f"loader/rank{r}"]) for r in range(len(found))]
