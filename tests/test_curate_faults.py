"""Curation tools under faults (#33.3-5): a damaged embed table, two embeds into one folder, a reshard onto a
full disk. Each injects the real fault (a file cut short, a second process, a small tmpfs) and checks the
outcome: one line, nothing lost, the input untouched."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import repo_root
from tests.curate_fixtures import reference, run, shards, vlp_cmd  # noqa: F401 - fixtures
from vlp.curate.store import LEGACY, PARQUET, load_tables, read_table, write_table


def legacy_copy(src: Path, dst: Path) -> Path:
    """`src`'s embed folder with its tables as the earlier .npz format."""
    shutil.copytree(src, dst)
    for p in sorted(dst.glob("*" + PARQUET)):
        t = read_table(p)
        write_table(p.with_suffix(LEGACY), str(t.pop("shard")), t)
        p.unlink()
    return dst


@pytest.mark.parametrize("suffix", [PARQUET, LEGACY])
def test_truncated_table_is_one_line_for_filter_and_embedded_again(reference, shards, micro_model_json, tmp_path,
                                                                   suffix):
    out = tmp_path / "emb"
    if suffix == LEGACY:
        legacy_copy(reference, out)
    else:
        shutil.copytree(reference, out)
    victim = out / f"000001{suffix}"
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])          # cut to half, as a killed copy leaves it

    r = run("filter", "--embeddings", str(out), "--out", str(tmp_path / "f"), "--min-words", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and f"unreadable shard table 000001{suffix}" in r.stderr

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("0*") if p.name != victim.name}
    r = run("embed", "--data", "::".join(shards), "--model", micro_model_json, "--out", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "embedded 1 shards" in r.stdout and f"{len(shards) - 1} already done" in r.stdout, r.stdout
    assert not victim.exists() or suffix == PARQUET        # the damaged .npz is replaced by a Parquet table
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*") if p.name in before} == before   # others untouched
    a, b = load_tables(str(out)), load_tables(str(reference))
    assert list(a.key) == list(b.key)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.score, b.score)


def test_legacy_npz_folder_is_read_and_converted(reference, tmp_path):
    old = legacy_copy(reference, tmp_path / "old")
    ref = load_tables(str(reference))
    for t in (load_tables(str(old)),):
        assert list(t.key) == list(ref.key) and list(t.shard) == list(ref.shard)
        np.testing.assert_array_equal(t.text, ref.text)
    r = run("convert-tables", "--embeddings", str(old))
    assert r.returncode == 0, r.stderr
    assert not list(old.glob("*" + LEGACY)) and len(list(old.glob("*" + PARQUET))) == len(set(ref.shard))
    t = load_tables(str(old))
    for name in ("key", "caption", "width", "height", "image_hash", "valid", "image", "text", "score"):
        np.testing.assert_array_equal(getattr(t, name), getattr(ref, name))


def test_second_embed_into_one_folder_is_refused_naming_the_holder(reference, shards, micro_model_json, tmp_path):
    """Embed #1 waits on a shard behind a stalled command (holding the folder); embed #2 into the same folder
    stops at once with one line naming #1's pid. Killed, #1 leaves the lock free: a third run finishes."""
    flag = tmp_path / "stalled-once"
    stall = f"pipe:sh -c 'test -e {flag} || {{ touch {flag}; sleep 120; }}; cat {shards[1]}'"
    spec = "::".join([shards[0], stall] + shards[2:])
    out = tmp_path / "emb"
    first = subprocess.Popen(vlp_cmd("embed", "--data", spec, "--model", micro_model_json, "--out", str(out),
                                     "--threads", "1"), cwd=repo_root(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not flag.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert flag.exists(), first.communicate()
        t0 = time.time()
        r = run("embed", "--data", spec, "--model", micro_model_json, "--out", str(out), "--threads", "1",
                timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"is in use by another `vlp data embed` (pid {first.pid} on " in r.stderr, r.stderr
        assert sorted(p.name for p in out.glob("0*")) == ["000000.parquet"]   # #2 wrote nothing
        assert time.time() - t0 < 60
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    r = run("embed", "--data", spec, "--model", micro_model_json, "--out", str(out), "--threads", "1")
    assert r.returncode == 0 and "1 already done" in r.stdout, r.stderr


# ---- reshard onto a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """(folder, preexec): a 160 KiB tmpfs when this user may mount one; else a folder and a 160 KiB file-size
    limit for the child (the write fails as on a full disk, EFBIG instead of ENOSPC)."""
    d = tmp_path / "disk"
    d.mkdir()
    size = 160 * 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                      capture_output=True).returncode == 0:
        yield d, None
        subprocess.run(["umount", "-l", str(d)], check=False)
        return

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    yield d, limit


def _hashes(paths) -> dict:
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def test_reshard_onto_a_full_disk_is_one_line_output_and_input_untouched(shards, small_disk, tmp_path):
    from vlp.data.tario import read_shard

    disk, preexec = small_disk
    out = disk / "curated"
    lines = ["shard\tkey\treason"] + [f"{u}\t{s.key}\t" for u in shards for s in read_shard(u)]
    small = tmp_path / "small.tsv"      # the first 20 samples: fits
    small.write_text("\n".join(lines[:21] + [f"{u}\t{k}\tclip_score" for u, k, _ in
                                             (x.split("\t") for x in lines[21:])]) + "\n")
    whole = tmp_path / "whole.tsv"      # every sample: does not fit
    whole.write_text("\n".join(lines) + "\n")
    assert sum(Path(u).stat().st_size for u in shards) > 2 * 160 * 1024
    r = subprocess.run(vlp_cmd("reshard", "--decisions", str(small), "--output", str(out), "--per-shard", "8"),
                       capture_output=True, text=True, cwd=repo_root(), preexec_fn=preexec)
    assert r.returncode == 0, r.stderr
    earlier = _hashes(sorted(out.iterdir()))
    inputs = _hashes(shards)

    r = subprocess.run(vlp_cmd("reshard", "--decisions", str(whole), "--output", str(out), "--per-shard", "50",
                               "--overwrite"), capture_output=True, text=True, cwd=repo_root(), preexec_fn=preexec)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and f"cannot write the new shards in {out}" in r.stderr
    assert ("No space left on device" if preexec is None else "File too large") in r.stderr
    assert _hashes(sorted(out.iterdir())) == earlier       # no staging folder left, earlier shards as they were
    assert _hashes(shards) == inputs
