"""data_tools: make_shards (table and folder input, bad rows), inspect_shards, add_rewrites, shard specs."""
from __future__ import annotations

import json

import pytest

from data_tools import add_rewrites, inspect_shards, make_shards
from tests.test_data_fixtures import jpeg, sigkill_while_staging, write_shards
from vlp.data.shards import load_shards
from vlp.data.tario import read_shard


def _samples(folder):
    out = {}
    for p in sorted(folder.glob("*.tar")):
        for s in read_shard(str(p)):
            out[s.key] = s.files
    return out


def test_make_shards_from_tsv_skips_and_counts_bad_rows(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(jpeg(1, (800, 600)))
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    cut = jpeg(2, (300, 200))
    (tmp_path / "c.jpg").write_bytes(cut[: len(cut) - 60])
    rows = ["url\tcaption\tlicense", "a.jpg\ta red thing\tcc", "b.png\tbroken\tcc", "missing.jpg\tgone\tcc",
            "a.jpg\t \tcc", "a.jpg\tsecond copy\tby", "c.jpg\tcut off\tcc"]
    (tmp_path / "in.tsv").write_text("\n".join(rows) + "\n")
    rc = make_shards.main(["--input", str(tmp_path / "in.tsv"), "--output", str(tmp_path / "out"),
                           "--per-shard", "1", "--resize-max", "200", "--quality", "80", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 2 of 6" in out and "corrupt_image 1" in out and "not_image 1" in out and "missing_image 1" in out and "empty_caption 1" in out
    s = _samples(tmp_path / "out")
    assert list(s) == ["000000000", "000000004"]  # keys = input row numbers
    meta = json.loads(s["000000004"]["json"])
    assert meta["license"] == "by" and meta["width"] == 200 and meta["height"] == 150 and meta["source"] == "a.jpg"
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 1, "00001.tar": 1}
    assert make_shards.main(["--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o2")]) == 2


def test_make_shards_from_folder_and_inspect(tmp_path, capsys):
    src = tmp_path / "pairs"
    src.mkdir()
    for i in range(5):
        (src / f"x{i}.jpg").write_bytes(jpeg(i))
        (src / f"x{i}.txt").write_text(f"caption number {i}")
    assert make_shards.main(["--input", str(src), "--out", str(tmp_path / "sh"), "--per-shard", "2",
                             "--no-progress"]) == 0
    assert load_shards(str(tmp_path / "sh" / "{00000..00002}.tar")).sizes == [2, 2, 1]
    capsys.readouterr()
    assert inspect_shards.main([str(tmp_path / "sh")]) == 0
    assert "5 samples" in capsys.readouterr().out
    # break a shard: duplicate key + corrupt image + truncated tar -> non-zero exit with the reasons
    write_shards(tmp_path / "bad", 6, 3, bad={1: {"jpg": jpeg(1)[:300]}})
    write_shards(tmp_path / "bad", 2, 2, start=0, sizes=False)  # overwrites 00000.tar with keys 0,1 ...
    p = tmp_path / "bad" / "00001.tar"
    p.write_bytes(p.read_bytes()[:1500])
    capsys.readouterr()
    assert inspect_shards.main([str(tmp_path / "bad" / "{00000..00001}.tar")]) == 1
    out = capsys.readouterr().out
    assert "truncated_tar" in out and "count_mismatch" in out


def test_inspect_finds_duplicates_and_corrupt_images(tmp_path):
    write_shards(tmp_path / "a", 4, 4, bad={2: {"jpg": jpeg(2)[:-40]}, 3: {"txt": b"\xff\xfe"}})
    write_shards(tmp_path / "b", 2, 2, start=1)
    r = inspect_shards.inspect(f"{tmp_path}/a/00000.tar::{tmp_path}/b/00000.tar")
    assert r["problems"] == {"duplicate_key": 2, "corrupt_image": 1, "bad_caption_encoding": 1}
    assert r["samples"] == 6 and not r["ok"]


def test_add_rewrites_laclip_and_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append(f"imgs/{i}.jpg,caption {i} here")
    (tmp_path / "orig.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "chatgpt.txt").write_text("".join(f"gpt says {i}\n" for i in range(4)))
    (tmp_path / "bard.txt").write_text("".join(f"bard says {i}\n" for i in range(4)))
    assert make_shards.main(["--input", str(tmp_path / "orig.csv"), "--no-header", "--output", str(tmp_path / "sh"),
                             "--per-shard", "3", "--no-progress"]) == 0
    before = (tmp_path / "sh" / "00000.tar").read_bytes()
    rc = add_rewrites.main(["--shards", str(tmp_path / "sh"), "--output", str(tmp_path / "rw"),
                            "--laclip-csv", str(tmp_path / "orig.csv"),
                            "--laclip-texts", str(tmp_path / "chatgpt.txt"), str(tmp_path / "bard.txt")])
    assert rc == 0
    assert (tmp_path / "sh" / "00000.tar").read_bytes() == before  # input untouched
    s = _samples(tmp_path / "rw")
    assert json.loads(s["000000002"]["json"])["rewrites"] == ["gpt says 2", "bard says 2"]
    assert json.loads((tmp_path / "rw" / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1}
    (tmp_path / "rw.jsonl").write_text(json.dumps({"key": "000000001", "rewrites": ["extra one here"]}) + "\n")
    assert add_rewrites.main(["--shards", str(tmp_path / "rw"), "--output", str(tmp_path / "rw2"),
                              "--jsonl", str(tmp_path / "rw.jsonl")]) == 0
    s2 = _samples(tmp_path / "rw2")
    assert json.loads(s2["000000001"]["json"])["rewrites"] == ["gpt says 1", "bard says 1", "extra one here"]
    assert json.loads(s2["000000000"]["json"])["rewrites"] == ["gpt says 0", "bard says 0"]
    # in place is refused; misaligned files are one-line errors
    assert add_rewrites.main(["--shards", str(tmp_path / "sh"), "--output", str(tmp_path / "sh"),
                              "--jsonl", str(tmp_path / "rw.jsonl")]) == 2
    (tmp_path / "short.txt").write_text("only one\n")
    assert add_rewrites.main(["--shards", str(tmp_path / "sh"), "--output", str(tmp_path / "rw3"),
                              "--laclip-csv", str(tmp_path / "orig.csv"), "--laclip-texts", str(tmp_path / "short.txt")]) == 2


def test_specs_sizes_and_stats_files(tmp_path):
    write_shards(tmp_path / "a", 6, 3, sizes=False)
    (tmp_path / "a" / "00000_stats.json").write_text(json.dumps({"successes": 3, "count": 4}))
    s = load_shards(f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/a/00000.tar", "1::2")
    assert s.urls[-1].endswith("a/00000.tar") and s.source == [0, 0, 1]
    assert s.sizes == [3, 3, 3]  # stats file, counted from the tar, stats file
    assert s.weights == [1.0, 2.0]


def test_staging_folder_of_a_sigkilled_make_shards_is_removed_by_the_next_run(tmp_path, capsys):
    """Issue 22.19: a SIGKILLed make-shards left its staging folder for ever. The run is killed for real while it
    writes (its next image is a FIFO nobody writes to, so it waits there, mid-run); the next run removes the dead
    run's folder, and leaves a live run's folder and another host's alone."""
    import os
    import sys

    from data_tools import staging

    rows = ["image,caption"]
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i, (64, 48)))
        rows.append(f"{i}.jpg,thing {i}")
    os.mkfifo(tmp_path / "stuck.jpg")
    (tmp_path / "in.csv").write_text("\n".join(rows + ["stuck.jpg,never read"]) + "\n")
    out = tmp_path / "out"
    dead = sigkill_while_staging([sys.executable, "-m", "data_tools.make_shards", "--input", str(tmp_path / "in.csv"),
                                  "--output", str(out), "--per-shard", "2", "--no-progress"],
                                 out, make_shards.STAGING_PREFIX)
    assert staging.is_abandoned(dead)
    live = staging.make(out, ".make_shards-")                 # this process's: alive
    elsewhere = staging.make(out, ".make_shards-")
    (elsewhere / staging.OWNER).write_text(json.dumps({"host": "another-node", "pid": 1, "start": None}))
    (tmp_path / "stuck.jpg").unlink()
    (tmp_path / "in.csv").write_text("\n".join(rows) + "\n")
    assert make_shards.main(["--input", str(tmp_path / "in.csv"), "--output", str(out), "--per-shard", "2",
                             "--no-progress"]) == 0
    assert f"removed {dead}" in capsys.readouterr().err
    assert sorted(out.glob(".make_shards-*")) == sorted([live, elsewhere])
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]


@pytest.mark.parametrize("where", ["proc", "readonly_mount"])
def test_inspect_json_onto_a_read_only_file_system_is_one_line(tmp_path, where):
    """Issue 22.16: `vlp data inspect --json` onto a read-only file system ended in a traceback. /proc refuses new
    files even to root (chmod does not stop root); /sys is mounted read-only in most containers."""
    import subprocess
    import sys

    write_shards(tmp_path / "sh", 4, 4)
    target = "/proc/vlp-report.json" if where == "proc" else "/sys/vlp-report.json"
    vlp = "import sys; from vlp.cli import main; sys.exit(main(sys.argv[1:]))"   # what the `vlp` script runs
    r = subprocess.run([sys.executable, "-c", vlp, "data", "inspect", str(tmp_path / "sh"), "--json", target],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert f"--json {target}" in r.stderr and "Traceback" not in r.stderr
