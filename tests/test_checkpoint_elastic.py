"""A checkpoint resumes on another number of ranks (#29.3), under DDP and --fsdp, with model and optimiser state bit
for bit as saved; a full disk on one rank fails the save on every rank; open_clip loads the model file of any
save; a checkpoint in vlp's earlier format still resumes. Real torchrun, gloo, the run's own Checkpointer
(tests/ckpt_ranks.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(n: int, action: str, run: Path, model_json: str, shards: str, fsdp: bool, out: Path, workers: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(_port()),
           str(ROOT / "tests" / "ckpt_ranks.py"), action, str(run / "checkpoints"), model_json, shards,
           "1" if fsdp else "0", str(out), str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _same(saved: dict, loaded: dict) -> list[str]:
    diff = [k for k, v in saved["model"].items() if not torch.equal(v, loaded["model"][k])]
    for k, v in saved["optim"].items():
        if not (torch.equal(v, loaded["optim"][k]) if torch.is_tensor(v) else v == loaded["optim"][k]):
            diff.append(k)
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
@pytest.mark.parametrize("saved_on,resumed_on", [(4, [2, 1]), (1, [2, 3])])
def test_resume_on_another_world_size_is_bit_exact_and_trains_on(demo_data, micro_model_json, tmp_path, fsdp,
                                                                  saved_on, resumed_on):
    shards = demo_data["train_data"]
    ranks(saved_on, "save", tmp_path / "a", micro_model_json, shards, fsdp, tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    main = tmp_path / "a" / "checkpoints" / "step_00000003.pt"
    for n in resumed_on:
        run = tmp_path / f"on{n}"
        (run / "checkpoints").mkdir(parents=True)   # the same checkpoint, resumed in a folder of its own
        for p in (main, main.with_name("step_00000003.dcp")):
            os.symlink(p, run / "checkpoints" / p.name)
        ranks(n, "load", run, micro_model_json, shards, fsdp, tmp_path / f"loaded{n}.pt")
        loaded = torch.load(tmp_path / f"loaded{n}.pt", weights_only=False)
        assert loaded["step"] == 3 and loaded["world"] == n
        assert _same(saved, loaded) == [], f"{saved_on} -> {n} ranks"
        assert (run / "checkpoints" / "step_00000005.pt").is_file()   # trained on 2 steps and saved on n ranks
    # open_clip reads the model file without knowing the rank count or the sharding
    import open_clip

    open_clip.add_model_config(micro_model_json)
    name = Path(micro_model_json).stem
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(main))
    state = {k: v.reshape(-1) for k, v in model.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())


@pytest.mark.slow
def test_workers_change_on_resume(demo_data, micro_model_json, tmp_path):
    """--workers 2 -> 3: the loader state is re-planned (vlp.data.plan.replan), the model state exact."""
    shards = demo_data["train_data"]
    ranks(2, "save", tmp_path / "a", micro_model_json, shards, False, tmp_path / "saved.pt", workers=2)
    ranks(2, "load", tmp_path / "a", micro_model_json, shards, False, tmp_path / "loaded.pt", workers=3)
    saved, loaded = torch.load(tmp_path / "saved.pt", weights_only=False), torch.load(tmp_path / "loaded.pt",
                                                                                        weights_only=False)
    assert _same(saved, loaded) == [] and loaded["loader"]["workers"] == 3 and loaded["loader"]["gen"] == 1


@pytest.mark.slow
def test_full_disk_on_one_rank_fails_the_save_on_every_rank_with_one_line(demo_data, micro_model_json, tmp_path):
    ranks(2, "full-disk", tmp_path / "a", micro_model_json, demo_data["train_data"], False, tmp_path / "line")
    lines = [Path(f"{tmp_path / 'line'}.rank{r}").read_text() for r in range(2)]
    for line in lines:
        assert line.startswith("CheckpointWriteError: checkpoint of step 3 not saved: rank 1: cannot write") \
            and "File too large" in line and "\n" not in line, lines
    folder = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000002.dcp", "step_00000002.pt"]
    from vlp.runtime import checkpoint as ckpt

    assert ckpt.resolve_resume("latest", folder).name == "step_00000002.pt"


@pytest.mark.slow
def test_a_checkpoint_in_the_earlier_format_still_resumes(demo_data, micro_model_json, tmp_path):
    """Written by the earlier writer (checkpoint_v1.save_v1, 2 ranks: a main file + a part), resumed exactly on
    as many ranks; its next save is a DCP checkpoint."""
    shards = demo_data["train_data"]
    ranks(2, "save-v1", tmp_path / "a", micro_model_json, shards, False, tmp_path / "saved.pt")
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names[:2] == ["latest", "step_00000003.pt"] and ".part1-" in names[2], names
    ranks(2, "load", tmp_path / "a", micro_model_json, shards, False, tmp_path / "loaded.pt")
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)
    assert loaded["step"] == 3 and _same(torch.load(tmp_path / "saved.pt", weights_only=False), loaded) == []
    assert (tmp_path / "a" / "checkpoints" / "step_00000005.dcp").is_dir()


@pytest.mark.slow
def test_train_py_saved_on_two_ranks_finishes_on_one_with_three_workers(demo_data, micro_model_json, tmp_path):
    """The whole run: torchrun 2 ranks saves at step 2 and 4; `train.py --resume .../step_00000002.pt` in one
    process with --workers 3 (was: `written by 2 processes; resume it with as many`) trains steps 3-6 and ends."""
    from tests.test_train_distributed import _torchrun

    common = ["--train-data", demo_data["train_data"], "--model", micro_model_json, "--batch-size", "8",
              "--save-every", "2", "--report-to", "none", "--no-progress"]
    _torchrun([*common, "--name", "two", "--max-steps", "4", "--workers", "2"], tmp_path)
    step2 = tmp_path / "two" / "checkpoints" / "step_00000002.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--logs", str(tmp_path), "--name", "one",
                           "--max-steps", "6", "--workers", "3", "--resume", str(step2)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {step2} at step 2" in proc.stderr + proc.stdout
    from vlp.runtime import checkpoint as ckpt

    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "one" / "checkpoints")] == [4, 6]
