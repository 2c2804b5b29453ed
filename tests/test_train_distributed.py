"""train.py under torchrun with 2 CPU processes (gloo): it runs, and a resumed run continues each rank's stream."""
import socket
import subprocess
import sys

import pytest

from tests.conftest import repo_root
from tests.test_train_loop import _losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, logs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           # `--` ends torchrun's own options: otherwise it takes `--logs` for its `--logs-specs`.
           str(repo_root() / "train.py"), "--", *args, "--logs", str(logs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("loss_flags", [["--gather-with-grad", "--local-loss"]])
def test_two_process_run_resumes_exactly(demo_data, micro_model_json, tmp_path, loss_flags):
    common = ["--train-data", demo_data["train_data"], "--model", micro_model_json, "--batch-size", "16",
              "--workers", "1", "--lr-scheduler", "const", "--warmup", "0", "--lr", "1e-3", "--log-every", "1",
              "--save-every", "2", "--report-to", "none", "--no-progress", *loss_flags]
    ref = _torchrun([*common, "--name", "ref", "--max-steps", "6"], tmp_path)
    assert ref.stdout.count('"run_dir"') == 1  # one summary, from rank 0
    _torchrun([*common, "--name", "split", "--max-steps", "3"], tmp_path)
    _torchrun([*common, "--name", "split", "--max-steps", "6", "--resume", "latest"], tmp_path)
    ref_losses, split_losses = _losses(tmp_path / "ref"), _losses(tmp_path / "split")
    assert sorted(split_losses) == list(range(1, 7))
    for step in range(1, 7):
        assert split_losses[step] == pytest.approx(ref_losses[step], abs=1e-6), step
