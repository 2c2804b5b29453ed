"""Progress displays without a terminal: real vlp commands with stderr to a file write plain lines only
(no carriage return, no line over 300 characters), and a terminal still gets tqdm's bar."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import repo_root

SCRIPT = textwrap.dedent("""
    import sys
    import vlp.progress
    vlp.progress.LINE_EVERY_S = float(sys.argv[2])   # a line at every update: the most a log can get
    from vlp.cli import main
    out, micro = sys.argv[1], sys.argv[3]
    steps = [
        ["data", "make-demo-data", "--out", out + "/demo", "--train-samples", "300", "--eval-samples", "40",
         "--image-size", "32", "--per-shard", "100"],
        ["eval", "--model", micro, "--data", out + "/demo/eval/demo_colors", out + "/demo/eval/demo_retrieval",
         "--batch-size", "8", "--output", out + "/eval"],
        ["train", "--train-data", out + "/demo/train/{00000..00002}.tar", "--model", micro, "--batch-size", "16",
         "--max-steps", "4", "--warmup", "1", "--workers", "0", "--logs", out + "/runs", "--name", "r",
         "--report-to", "none", "--eval-data", out + "/demo/eval/demo_colors", "--eval-every", "2"],
    ]
    for argv in steps:
        rc = main(argv)
        assert rc in (0, None), (argv, rc)
""")


def test_commands_write_plain_lines_to_a_log_file(tmp_path, micro_model_json):
    log = tmp_path / "log.txt"
    with open(log, "wb") as err:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "0", micro_model_json], cwd=repo_root(),
                              stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    data = log.read_bytes()
    assert proc.returncode == 0, data[-2000:]
    lines = data.decode().splitlines()
    assert b"\r" not in data and b"\x1b[" not in data
    assert max(len(ln) for ln in lines) <= 300, max(lines, key=len)
    # the tools did report progress, as lines: the demo data's bar and eval's image batches
    assert any(ln.startswith("train shards: 300/300 img") for ln in lines), lines[:20]
    assert any(ln.startswith("wds/demo_colors images:") for ln in lines)
    assert any(ln.startswith("step 4/4") for ln in lines)


def test_short_jobs_print_nothing_and_a_terminal_gets_the_bar(tmp_path):
    import os
    import pty

    from vlp.progress import LineProgress, progress_bar

    with open(tmp_path / "f", "w") as fh:
        for _ in progress_bar(range(100), desc="quick", leave=False, file=fh):    # under LINE_EVERY_S: silent
            pass
        bar = progress_bar(range(1), desc="kept", file=fh)       # a bar tqdm would leave: one final line
        assert isinstance(bar, LineProgress)
        list(bar)
    assert (tmp_path / "f").read_text().splitlines()[0].startswith("kept: 1/1 it [")
    assert len((tmp_path / "f").read_text().splitlines()) == 1
    master, slave = pty.openpty()
    with open(slave, "w") as tty:
        bar = progress_bar(range(3), desc="tty", file=tty)
        assert not isinstance(bar, LineProgress)
        list(bar)
    assert b"\r" in os.read(master, 65536)
    os.close(master)
