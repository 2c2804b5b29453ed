"""The training console: banner fields, plain log lines, eval table, summary, start-up warnings, the
progress bar on a real terminal, and the CPU thread choice."""
from __future__ import annotations

import os
import re
import select
from pathlib import Path

import pytest

from vlp.config import parse_config
from vlp.train.console import Console, eval_table
from vlp.train.loop import train
from vlp.train.threads import configure_threads, pick_threads


def _flags(demo_data, model_json, logs, name, *extra):
    return ["--train-data", demo_data["train_data"], "--model", model_json, "--logs", str(logs), "--name", name,
            "--batch-size", "32", "--workers", "1", "--report-to", "none", "--no-progress", *extra]


def test_plain_console_banner_log_lines_eval_table_summary(demo_data, micro_model_json, tmp_path, capsys):
    """--no-progress: the banner's fields, one line per --log-every steps (loss terms, lr, scale, rate, eta),
    the in-loop eval table, and a summary naming the checkpoint and export that exist."""
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "plain", "--max-steps", "6", "--log-every", "2",
                              "--warmup", "2", "--uniformity-weight", "0.5", "--eval-every", "3",
                              "--eval-data", demo_data["eval_data"][0]))
    train(cfg)
    err = capsys.readouterr().err
    for field in ("model ", "parameters", "devices ", "torch threads", "precision   fp32", "batch       global 32",
                  "schedule    6 steps", "samples", "data        4 shards, 600 samples", "run folder"):
        assert field in err, (field, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/6", "4/6", "6/6"]
    assert all(re.search(r"loss \d\.\d{4} \| clip [\d.]+ \| uniformity -?[\d.]+ \| lr [\d.e+-]+ \| scale [\d.]+ \| "
                         r"\d+ samples/s \| data_wait \d+% \| step_ms \d+ \| elapsed \d+:\d\d \| eta \d+:\d\d", ln)
               for ln in lines), lines
    assert "eval at step 3:" in err and "eval at step 6:" in err
    table = err[err.index("eval at step 3:"):].splitlines()
    assert table[1].split()[:4] == ["dataset", "acc1", "acc5", "mpcr"] and table[2].split()[0] == "wds/demo_colors"
    ckpt = re.search(r"checkpoint: (\S+)", err).group(1)
    export = re.search(r"export: +(\S+)", err).group(1)
    assert Path(ckpt).name == "step_00000006.pt" and Path(ckpt).is_file()
    assert (Path(export) / "open_clip_config.json").is_file()
    assert re.search(r"done: 6 steps, 192 samples seen", err)


def test_startup_warnings(demo_data, micro_model_json, tmp_path, capsys):
    """Shards without rewrites under --use-rewrites, warmup longer than the run, a missing shard from a
    brace list, and bf16 on CPU: each one line, once."""
    from data_tools import make_shards

    src = tmp_path / "plain"
    src.mkdir()
    import PIL.Image

    rows = []
    for i in range(40):
        PIL.Image.new("RGB", (32, 32), (i * 5, 0, 0)).save(src / f"{i}.png")
        rows.append(f"{src / f'{i}.png'}\tred square number {i}")
    (tmp_path / "in.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    assert make_shards.main(["--input", str(tmp_path / "in.tsv"), "--output", str(tmp_path / "sh"),
                             "--per-shard", "20"]) == 0
    spec = str(tmp_path / "sh" / "{00000..00002}.tar")   # 00002.tar does not exist
    cfg = parse_config(_flags({"train_data": spec}, micro_model_json, tmp_path, "warn", "--batch-size", "8",
                              "--max-steps", "2", "--warmup", "10", "--use-rewrites", "--precision", "bf16",
                              "--max-bad-fraction", "0.5"))
    train(cfg)
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 4, "\n".join(warnings)
    assert any("1 of 3 shards" in w and "00002.tar" in w for w in warnings)
    assert any("--use-rewrites" in w and "no 'rewrites'" in w for w in warnings)
    assert any("--warmup 10" in w and "2 steps" in w for w in warnings)
    assert any("--precision bf16 on CPU" in w for w in warnings)

    # the demo shards do carry rewrites: no rewrites warning there, and none about warmup or precision
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "quiet", "--max-steps", "2", "--warmup", "1",
                              "--use-rewrites", "--precision", "fp32"))
    train(cfg)
    assert "warning:" not in capsys.readouterr().err


def test_progress_bar_on_a_terminal_shows_the_figures():
    """On a real terminal (a pty) the bar carries loss, lr, logit scale and rate; through a pipe, plain lines."""
    import pty

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a 200-column terminal
    with open(slave, "w") as tty:
        con = Console(True, True, stream=tty)
        assert con.use_bar
        con.start(0, 4)
        for step in range(1, 5):
            con.step(step)
            con.log(step, {"train/loss": 1.5, "train/clip": 1.5, "train/lr": 1e-3, "train/logit_scale": 14.3,
                           "train/samples_per_s": 250.0, "perf/data_wait_frac": 0.25})
        con.close()
    out = b""
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    out = out.decode()
    assert "4/4" in out and "loss 1.5000" in out and "lr 1.00e-03" in out and "scale 14.3" in out
    assert "250 samples/s" in out and "data_wait 25%" in out
    assert not Console(True, True, stream=open(os.devnull, "w")).use_bar   # not a terminal: plain lines


def test_eval_table_headline_first():
    t = eval_table({"eval/a/geometry/modality_gap": 0.5, "eval/a/acc1": 0.25, "eval/b/text_retrieval_recall@1": 0.125,
                    "eval/a/acc5": float("nan"), "eval/c/acc": 0.75, "eval/c/acc/swap_att": 0.5})
    head, a, b, c = t.splitlines()
    assert head.split() == ["dataset", "acc1", "acc5", "i2t@1", "acc", "gap"]
    assert a.split() == ["a", "0.250", "-", "-", "-", "0.500"] and b.split() == ["b", "-", "-", "0.125", "-", "-"]
    assert c.split() == ["c", "-", "-", "-", "0.750", "-"]     # a compositional set's overall accuracy


def test_thread_choice():
    """cores // processes - workers, at least one; --threads and OMP_NUM_THREADS win; applied to torch."""
    import torch

    assert pick_threads(2, 2) == 1 and pick_threads(16, 4) == 12 and pick_threads(16, 2, local_processes=4) == 2
    before = torch.get_num_threads()
    env = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        n, why = configure_threads(None, 0, "cpu")
        assert n == torch.get_num_threads() == pick_threads(len(os.sched_getaffinity(0)), 0) and "cores" in why
        assert configure_threads(3, 0, "cpu") == (3, "--threads") and torch.get_num_threads() == 3
        os.environ["OMP_NUM_THREADS"] = "1"
        assert configure_threads(None, 0, "cpu")[1] == "OMP_NUM_THREADS"
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if env is not None:
            os.environ["OMP_NUM_THREADS"] = env
        torch.set_num_threads(before)


def test_help_shows_every_default(monkeypatch):
    """train.py --help prints this parser's help: every option of the config with its default."""
    from vlp.config import FIELDS, build_parser

    monkeypatch.setenv("COLUMNS", "400")
    help_text = build_parser().format_help()
    blocks, current = {}, None
    for ln in help_text.splitlines():
        if ln.startswith("  -"):
            current = ln.split()[0].rstrip(",")
            blocks[current] = ln
        elif current and ln.startswith("   "):
            blocks[current] += " " + ln.strip()
        else:
            current = None
    assert len(blocks) > len(FIELDS)
    for name in FIELDS:
        block = blocks.get("--" + name.replace("_", "-"))
        assert block is not None and "default: " in block, (name, block)


def test_train_help_answers_before_torch_is_imported():
    """train.py --help and a bad flag are answered by the parser alone (torch took 11-23 s to import here)."""
    import subprocess
    import sys

    from tests.conftest import repo_root

    code = ("import runpy, sys; sys.argv = ['train.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    print('torch' in sys.modules, e.code)\n") % str(repo_root() / "train.py")
    for args, code_out in ((["--help"], "False 0"), (["--lr", "nan"], "False 2")):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == code_out, (args, out.stdout[-500:], out.stderr[-500:])


def test_training_error_through_train_py_is_one_line(monkeypatch, capsys):
    import train as train_py
    import vlp.train.loop as loop
    from vlp.train.health import TrainingError

    def fail(cfg):
        raise TrainingError("loss is nan at step 3; the state before this step is saved in X")

    monkeypatch.setattr(loop, "train", fail)
    assert train_py.main(["--train-data", "x.tar"]) == 2
    assert capsys.readouterr().err == "error: loss is nan at step 3; the state before this step is saved in X\n"


def test_banner_names_the_device_kind_for_several_processes():
    """Under torchrun every rank has its own device index: the banner says `2 x cpu`, not rank 0's `cpu:0`."""
    from types import SimpleNamespace

    import torch

    from vlp.train.console import banner_fields

    shards = SimpleNamespace(source=[], urls=[], sizes=[], weights=[], missing=[])
    common = dict(model_name="m", net=torch.nn.Linear(2, 2), flops=None, precision="fp32", threads=(1, "x"),
                  samples_per_epoch=10, steps_per_epoch=1, total_steps=1, global_batch=2, accum=1, run_dir=Path("r"),
                  shards=shards, workers=0)
    two = dict(banner_fields(device="cpu:0", world=2, **common))
    one = dict(banner_fields(device="cuda:1", world=1, **common))
    assert two["devices"].startswith("2 x cpu,") and one["devices"] == "1 x cuda:1"


@pytest.mark.parametrize("argv", [["data", "make-shards", "--bogus"], ["eval", "--data", "x", "--bogus"],
                                  ["train", "--train-data", "x", "--bogus"], ["export-hf"], ["nope"]])
def test_every_command_answers_a_bad_command_line_with_one_error_line(argv, capsys):
    from vlp.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_demo_says_where_it_writes_its_data(tmp_path, capsys, monkeypatch):
    import data_tools.make_demo_data as M
    from vlp.demo import ensure_data

    real = M.make_demo_data
    monkeypatch.setattr(M, "make_demo_data", lambda out, train_samples: real(out, train_samples, eval_samples=40,
                                                                              image_size=32, progress=False))

    ensure_data(tmp_path / "data", 200)
    first = capsys.readouterr().err
    assert "demo data: writing 200 training samples" in first and str(tmp_path / "data") in first
    assert "written in" in first
    ensure_data(tmp_path / "data", 200)
    assert "written before" in capsys.readouterr().err


def test_demo_prints_its_figures_once(tmp_path, micro_model_json, capsys, monkeypatch):
    """Issue 25.12: the demo printed the same four-set figures as the step-350 eval table, as "last eval" and as
    its own table. Now once: its own table, with the chance levels, after a summary that points to it."""
    import data_tools.make_demo_data as M
    from vlp import demo

    real = M.make_demo_data
    monkeypatch.setattr(M, "make_demo_data", lambda out, train_samples: real(out, train_samples, eval_samples=40,
                                                                              image_size=32, progress=False))
    rc = demo.main(["--output", str(tmp_path), "--train-samples", "200", "--name", "once", "--",
                    "--model", micro_model_json, "--max-steps", "3", "--batch-size", "16", "--workers", "0",
                    "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "eval at step" not in captured.err and "last eval: step 3, below" in captured.err, captured.err
    table = captured.out[captured.out.index("dataset "):].splitlines()[1:]
    assert {row.split()[0].rsplit("/", 1)[-1] for row in table} == {"demo_colors", "demo_shapes", "demo_retrieval",
                                                 "demo_compositional"}, table
    assert sum("acc1 at chance" in row for row in table) == 2 and sum("acc at chance" in row for row in table) == 1
