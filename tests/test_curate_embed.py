"""`vlp data embed`: embeddings equal the model's own, kill and resume per shard, torchrun ranks split shards,
bad input in one line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import repo_root
from tests.curate_fixtures import reference, run, shards, vlp_cmd  # noqa: F401 - fixtures
from vlp.curate.store import load_tables, read_table


def test_embeddings_are_the_models_own(reference, shards, micro_model_json):
    """Against open_clip's encode_image/encode_text on the same decoded pixels and tokens."""
    import torch

    from vlp.data.images import decode_rgb
    from vlp.data.tario import read_shard
    from vlp.models import create_model

    t = load_tables(str(reference))
    assert len(t) == sum(1 for u in shards for _ in read_shard(u)) and t.valid.all()
    torch.manual_seed(0)
    b = create_model(micro_model_json)
    b.model.eval()
    samples = list(read_shard(shards[0]))[:16]
    with torch.no_grad():
        x = torch.stack([b.preprocess_val(decode_rgb(s.image)) for s in samples])
        img = torch.nn.functional.normalize(b.model.encode_image(x), dim=-1).numpy()
        txt = torch.nn.functional.normalize(b.model.encode_text(b.tokenizer([s.caption() for s in samples])),
                                            dim=-1).numpy()
    np.testing.assert_allclose(t.image[:16].astype(np.float32), img, atol=2e-3)
    np.testing.assert_allclose(t.text[:16].astype(np.float32), txt, atol=2e-3)
    np.testing.assert_allclose(t.score[:16], (img * txt).sum(1), atol=1e-4)
    assert list(t.key[:16]) == [s.key for s in samples]
    assert (t.width[:16] > 0).all() and len(set(t.image_hash)) > len(t) // 2


def test_kill_and_resume_per_shard(reference, shards, micro_model_json, tmp_path):
    """Shard 2 arrives through a command that stalls the first time; the run is killed (SIGKILL to its process
    group) while waiting on it. The second run keeps shards 0-1 as written and ends equal to a clean run."""
    flag = tmp_path / "stalled-once"
    stall = f"pipe:sh -c 'test -e {flag} || {{ touch {flag}; sleep 120; }}; cat {shards[2]}'"
    spec = "::".join(shards[:2] + [stall] + shards[3:])
    out = tmp_path / "emb"
    p = subprocess.Popen(vlp_cmd("embed", "--data", spec, "--model", micro_model_json, "--out", str(out),
                                 "--threads", "1"), cwd=repo_root(), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert flag.exists(), p.communicate()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = sorted(x.name for x in out.glob("*.parquet"))
    assert done == ["000000.parquet", "000001.parquet"] and not (out / "done.json").exists()
    before = {n: (out / n).stat().st_mtime_ns for n in done}
    with pytest.raises(Exception, match="incomplete"):
        load_tables(str(out))
    r = run("embed", "--data", spec, "--model", micro_model_json, "--out", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "2 already done" in r.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in done} == before
    a, b = load_tables(str(out)), load_tables(str(reference))
    assert list(a.key) == list(b.key)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.score, b.score)


@pytest.mark.slow
def test_torchrun_two_ranks_split_shards(reference, shards, micro_model_json, tmp_path):
    from tests.test_train_distributed import _free_port

    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "vlp", "data", "embed", "--data", "::".join(shards), "--model", micro_model_json, "--out", str(out),
           "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for i in range(len(shards)):   # rank r of 2 wrote shards r, r + 2, ...
        assert f"[rank {i % 2}/2] {i:06d}.parquet" in r.stderr
    a, b = load_tables(str(out)), load_tables(str(reference))
    assert list(a.key) == list(b.key)
    np.testing.assert_allclose(a.image.astype(np.float32), b.image.astype(np.float32), atol=1e-3)


def test_bad_input_one_line(reference, shards, micro_model_json, tmp_path):
    from vlp.data.tario import ShardWriter

    no_images = tmp_path / "text_only.tar"
    with ShardWriter(str(no_images), 10) as w:
        for i in range(3):
            w.write(f"{i:04d}", {"txt": b"a caption", "json": b"{}"})
    r = run("embed", "--data", str(no_images), "--model", micro_model_json, "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "none of its 3 samples holds a readable image" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    # a folder written by another model (other weights) is refused, and left as it was
    import torch

    from vlp.models import create_model

    torch.manual_seed(123)
    other = tmp_path / "other.pt"
    torch.save(create_model(micro_model_json).model.state_dict(), other)
    r = run("embed", "--data", shards[0], "--model", micro_model_json, "--checkpoint", str(other),
            "--out", str(reference))
    assert r.returncode == 2 and "holds embeddings of another model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    # a checkpoint of another architecture
    r = run("embed", "--data", shards[0], "--model", "vlp-tiny", "--checkpoint", str(other),
            "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "does not fit this architecture" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert read_table(Path(reference) / "000000.parquet") is not None


def test_filter_cli_writes_decisions_report_and_sheets(reference, tmp_path):
    import json

    out = tmp_path / "f"
    r = run("filter", "--embeddings", str(reference), "--out", str(out), "--min-words", "2", "--dedup-image",
            "--top-fraction", "0.5", "--semdedup-eps", "0.01", "--semdedup-clusters", "4")
    assert r.returncode == 0, r.stderr
    rows = (out / "decisions.tsv").read_text().splitlines()
    t = load_tables(str(reference))
    assert rows[0] == "shard\tkey\treason" and len(rows) == len(t) + 1
    rep = json.loads((out / "report.json").read_text())
    removed = sum(1 for x in rows[1:] if x.split("\t")[2])
    assert sum(c["removed"] for c in rep["rules"]) == removed and rep["kept"] == len(t) - removed
    assert {c["rule"] for c in rep["rules"]} == {"unreadable", "caption_words", "exact_image", "clip_score", "semdedup"}
    assert (out / "scores.png").stat().st_size > 0 and (out / "removed_clip_score.png").stat().st_size > 0
    again = run("filter", "--embeddings", str(reference), "--out", str(out))
    assert again.returncode == 2 and "already holds decisions.tsv" in again.stderr
