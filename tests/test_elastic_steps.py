"""How long a run resumed on another number of ranks trains (issue 29.3): without --max-steps it trains exactly
the rest of its epochs, counted on the new ranks, not `--epochs x` the new world's steps per epoch (which stopped
a run resumed on more ranks at once, or mid-epoch). A real 1-rank run, then a real 2-rank torchrun on gloo."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import repo_root
from vlp.runtime import checkpoint as ckpt

LR, WARMUP, EPOCHS = 2e-3, 2, 3


def _train(demo_data, model_json, logs, ranks: int, *extra: str) -> None:
    from tests.test_train_distributed import _free_port

    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
        str(_free_port())]
    cmd = [*launch, str(repo_root() / "train.py"), *([] if ranks == 1 else ["--"]),
           "--train-data", demo_data["train_data"], "--model", model_json, "--logs", str(logs), "--name", "grow",
           "--batch-size", "16", "--workers", "1", "--lr", str(LR), "--warmup", str(WARMUP), "--report-to", "none",
           "--no-progress", "--seed", "5", "--log-every", "1", "--epochs", str(EPOCHS), *extra]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_one_rank_resumed_on_two_without_max_steps_trains_the_rest_of_its_epochs(demo_data, micro_model_json,
                                                                                   tmp_path):
    """600 samples, 16 a batch: 37 steps an epoch on 1 rank, 18 on 2. Stopped at step 44 (epoch 1 after 7 of its
    37 steps: 30 x 16 = 480 samples left), resumed on 2 ranks with --epochs 3: those 480 samples are 15 steps of
    2 x 16, then epoch 2 is 18 steps: the run ends at 44 + 15 + 18 = 77 (before: at 3 x 18 = 54, mid-epoch 1's
    rest, with epoch 2 never trained; a run stopped past step 54 ended at once). The lr schedule is aimed at 77."""
    _train(demo_data, micro_model_json, tmp_path, 1, "--max-steps", "44", "--save-every", "100")
    _train(demo_data, micro_model_json, tmp_path, 2, "--resume", "latest", "--save-every", "59")
    rows = {}
    for line in (tmp_path / "grow" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/epoch" in row:
            rows[row["step"]] = row
    total = 44 + 480 // 32 + 600 // 32
    assert sorted(rows) == list(range(1, total + 1))
    epochs = [rows[s]["train/epoch"] for s in range(45, total + 1)]
    assert epochs == [1] * 15 + [2] * 18   # the interrupted epoch's rest, then one whole epoch on 2 ranks
    end_of_rest = ckpt.loader_states(tmp_path / "grow" / "checkpoints" / ckpt.checkpoint_name(59))
    for state in end_of_rest:   # the epoch's untrained samples, each planned once, all trained by step 59
        assert state["epoch"] == 1 and state["world_size"] == 2
        assert sum(b - a for a, b in state["pool"]) == 37 * 16 - 7 * 16
        assert state["batches_done"] == state["epoch_batches"] == 15
    last = ckpt.loader_states(tmp_path / "grow" / "checkpoints" / ckpt.checkpoint_name(total))
    assert [(s["epoch"], s["batches_done"], s["epoch_batches"]) for s in last] == [(2, 18, 18)] * 2

    def cosine(k: int) -> float:   # the lr after k steps of a run of `total` steps (vlp.train.optim)
        return LR * 0.5 * (1 + math.cos(math.pi * (k - WARMUP) / (total - WARMUP)))

    for step in (45, 60, total):
        assert rows[step]["train/lr"] == pytest.approx(cosine(step), abs=1e-9)
