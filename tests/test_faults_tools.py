"""Faults injected into the data tools (issue 11, items 12-15): an input error during --overwrite, two
sources sharing shard names, names that are paths, and inputs that used to give tracebacks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools import add_rewrites, inspect_shards, make_shards, rewrite_captions


def _pairs(folder: Path, n: int, name: str = "pairs.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 40 % 255, 0, 0)).save(folder / f"{i}.jpg")
        rows.append(f"{i}.jpg,red square number {i}")
    (folder / name).write_text("\n".join(rows) + "\n")
    return folder / name


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(tool, argv, capsys) -> tuple[int, str]:
    rc = tool.main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_overwrite_with_a_bad_input_leaves_the_folder_as_it_was(tmp_path, capsys):
    csv = _pairs(tmp_path / "in", 4)
    out = tmp_path / "shards"
    assert make_shards.main(["--input", str(csv), "--output", str(out), "--per-shard", "2", "--no-progress"]) == 0
    (out / "other_00000.tar").write_bytes(b"another prefix's shard")
    before = _snapshot(out)
    rc, err = _run(make_shards, ["--input", str(csv), "--output", str(out), "--caption-col", "nope", "--overwrite",
                                 "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no column 'nope'" in err
    assert _snapshot(out) == before
    # A successful overwrite replaces this prefix's shards only, and keeps the other prefix's sizes entry.
    sizes = json.loads((out / "sizes.json").read_text())
    (out / "sizes.json").write_text(json.dumps({**sizes, "other_00000.tar": 7}))
    assert make_shards.main(["--input", str(csv), "--output", str(out), "--per-shard", "4", "--overwrite",
                             "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "other_00000.tar"]
    assert (out / "other_00000.tar").read_bytes() == b"another prefix's shard"
    assert json.loads((out / "sizes.json").read_text()) == {"other_00000.tar": 7, "00000.tar": 4}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_empty_input_and_urls_are_errors_not_a_spec(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    rc, err = _run(make_shards, ["--input", str(empty), "--output", str(tmp_path / "o1"), "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no samples written" in err
    assert not list((tmp_path / "o1").glob("*.tar")) and not (tmp_path / "o1" / "sizes.json").exists()
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttps://example.com/a.jpg,a cat\n")
    rc, err = _run(make_shards, ["--input", str(urls), "--output", str(tmp_path / "o2"), "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "does not download" in err and "img2dataset" in err


@pytest.mark.parametrize("prefix", ["../../x_", "sub/x_", "a%sb", ".."])
def test_shard_prefix_must_stay_inside_the_output(tmp_path, capsys, prefix):
    csv = _pairs(tmp_path / "in", 2)
    out = tmp_path / "a" / "b" / "out"
    rc, err = _run(make_shards, ["--input", str(csv), "--output", str(out), "--prefix", prefix, "--no-progress"],
                   capsys)
    assert rc == 2 and err.count("\n") == 1 and "--prefix" in err, err
    assert not list(tmp_path.rglob("*.tar"))


def test_rewrite_run_name_must_stay_inside_the_output(tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("a red square\n")
    rc, err = _run(rewrite_captions, ["--input", str(caps), "--output", str(tmp_path / "a" / "out"), "--rule-based",
                                      "--name", "../../x", "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--name" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.txt"]


def _two_sources(tmp_path: Path) -> str:
    specs = []
    for src, n in (("cc3m", 3), ("cc12m", 5)):
        csv = _pairs(tmp_path / f"in_{src}", n)
        assert make_shards.main(["--input", str(csv), "--output", str(tmp_path / src), "--no-progress"]) == 0
        specs.append(str(tmp_path / src / "00000.tar"))
    return "::".join(specs)


def test_sources_sharing_shard_names_keep_every_sample(tmp_path, capsys):
    spec = _two_sources(tmp_path)
    rewrites = tmp_path / "rw.jsonl"
    rewrites.write_text(json.dumps({"key": "000000001", "rewrites": ["a square, red"]}) + "\n")
    out = tmp_path / "rw"
    capsys.readouterr()
    assert add_rewrites.main(["--shards", spec, "--output", str(out), "--jsonl", str(rewrites)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 8
    assert json.loads((out / "sizes.json").read_text()) == {"cc3m_00000.tar": 3, "cc12m_00000.tar": 5}
    from vlp.data.tario import read_shard

    assert sum(1 for p in out.glob("*.tar") for _ in read_shard(str(p))) == 8


@pytest.mark.parametrize("content,expect", [
    (b"\xff\xfe not utf-8\n", "not UTF-8"),
    (b'{"key": "000000000", "rewrites": null}\n', "must be a string or a list of strings"),
    (b'{"key": "000000000", "rewrites": 3}\n', "must be a string or a list of strings"),
])
def test_bad_rewrite_files_are_one_line(tmp_path, capsys, content, expect):
    csv = _pairs(tmp_path / "in", 2)
    assert make_shards.main(["--input", str(csv), "--output", str(tmp_path / "s"), "--no-progress"]) == 0
    bad = tmp_path / "rw.jsonl"
    bad.write_bytes(content)
    rc, err = _run(add_rewrites, ["--shards", str(tmp_path / "s"), "--output", str(tmp_path / "o"), "--jsonl",
                                  str(bad)], capsys)
    assert rc == 2 and err.count("\n") == 1 and expect in err, err


def test_laclip_text_not_utf8_is_one_line(tmp_path, capsys):
    csv = _pairs(tmp_path / "in", 2)
    assert make_shards.main(["--input", str(csv), "--output", str(tmp_path / "s"), "--no-progress"]) == 0
    (tmp_path / "orig.csv").write_text("0.jpg,red square number 0\n1.jpg,red square number 1\n")
    (tmp_path / "chatgpt.txt").write_bytes(b"fine\n\xe9t\xe9\n")
    rc, err = _run(add_rewrites, ["--shards", str(tmp_path / "s"), "--output", str(tmp_path / "o"), "--laclip-csv",
                                  str(tmp_path / "orig.csv"), "--laclip-texts", str(tmp_path / "chatgpt.txt")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "chatgpt.txt:2: not UTF-8" in err, err


def test_inspect_report_into_a_missing_folder_fails_before_the_scan(tmp_path, capsys, monkeypatch):
    def no_scan(*a, **k):
        raise AssertionError("scanned before checking --json")

    monkeypatch.setattr(inspect_shards, "inspect", no_scan)
    rc, err = _run(inspect_shards, [str(tmp_path), "--json", str(tmp_path / "missing" / "r.json")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
