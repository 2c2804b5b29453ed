"""`vlp data reshard`: kept samples copied byte for byte, readable by webdataset and open_clip_train's size
lookup and by vlp's loader; atomic (a failed run leaves --output as it was); one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_root
from tests.test_data_fixtures import sigkill_while_staging
from vlp.curate.reshard import STAGING_PREFIX, reshard
from vlp.curate.store import CurateError


@pytest.fixture(scope="module")
def pool(demo_data):
    from vlp.data.shards import shard_urls
    from vlp.data.tario import read_shard

    urls = shard_urls(demo_data["train_data"])
    return {u: {s.key: dict(s.files) for s in read_shard(u)} for u in urls}


def write_decisions(path: Path, pool, keep_every: int = 3) -> dict:
    kept = {}
    lines = ["shard\tkey\treason"]
    for u, samples in pool.items():
        for i, k in enumerate(samples):
            ok = i % keep_every == 0
            lines.append(f"{u}\t{k}\t{'' if ok else 'clip_score'}")
            if ok:
                kept[k] = samples[k]
    path.write_text("\n".join(lines) + "\n")
    return kept


def test_reshard_keeps_exactly_the_kept_samples_readable_by_webdataset(pool, tmp_path):
    import webdataset as wds
    from open_clip_train.data import get_dataset_size

    kept = write_decisions(tmp_path / "decisions.tsv", pool)
    out = tmp_path / "curated"
    stats = reshard(str(tmp_path / "decisions.tsv"), str(out), per_shard=70)
    assert stats["written"] == len(kept) and stats["skipped"] == {"clip_score": sum(map(len, pool.values())) - len(kept)}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(kept) and max(sizes.values()) == 70
    spec = stats["train_data"]
    assert get_dataset_size(spec)[0] == len(kept)   # open_clip_train's --train-num-samples lookup
    got = {}
    for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False):
        if "jpg" in s:
            got[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    assert list(got) == list(kept)                   # pool order, nothing else
    assert all(got[k] == kept[k] for k in kept)      # every member, byte for byte (json with rewrites too)
    assert not list(out.glob(".reshard-*"))


def test_reshard_output_trains_in_vlp_loader(pool, tmp_path):
    from vlp.data.shards import load_shards

    write_decisions(tmp_path / "d.tsv", pool, keep_every=2)
    stats = reshard(str(tmp_path / "d.tsv"), str(tmp_path / "o"), per_shard=100)
    assert load_shards(stats["train_data"]).total == stats["written"]


def test_failed_reshard_leaves_output_unchanged(pool, tmp_path):
    write_decisions(tmp_path / "d.tsv", pool)
    out = tmp_path / "curated"
    reshard(str(tmp_path / "d.tsv"), str(out), per_shard=70)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with open(tmp_path / "d.tsv", "a") as f:     # a kept key the shard does not hold
        f.write(f"{next(iter(pool))}\tno-such-key\t\n")
    with pytest.raises(CurateError, match="1 kept keys are not in the shard"):
        reshard(str(tmp_path / "d.tsv"), str(out), per_shard=10, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(CurateError, match="already holds"):
        reshard(str(tmp_path / "d.tsv"), str(out))


def test_reshard_cli_bad_decisions_one_line(tmp_path):
    bad = tmp_path / "keep.txt"
    bad.write_text("just some keys\n")
    r = subprocess.run([sys.executable, "-m", "vlp", "data", "reshard", "--decisions", str(bad), "--output",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=repo_root())
    assert r.returncode == 2 and "is not a `vlp data filter` decisions.tsv" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_staging_folder_of_a_sigkilled_reshard_is_removed_by_the_next_run(pool, tmp_path, capsys):
    """As for make-shards (issue 22.19): reshard's staging folder names its owner, so the folder a SIGKILLed run
    left behind is removed by the next one. The run is killed for real, while it waits on a shard that is a FIFO
    nobody writes to, after it has written the kept samples of the shard before it."""
    import os

    from data_tools import staging

    first = next(iter(pool))
    stuck = tmp_path / "stuck.tar"
    os.mkfifo(stuck)
    keys = list(pool[first])
    (tmp_path / "d.tsv").write_text("shard\tkey\treason\n" + "".join(f"{first}\t{k}\t\n" for k in keys) +
                                    f"{stuck}\tnever\t\n")
    out = tmp_path / "curated"
    dead = sigkill_while_staging([sys.executable, "-m", "vlp", "data", "reshard", "--decisions",
                                  str(tmp_path / "d.tsv"), "--output", str(out), "--per-shard", "10"],
                                 out, STAGING_PREFIX, shards=2, cwd=repo_root())
    assert staging.is_abandoned(dead)
    write_decisions(tmp_path / "d.tsv", pool)
    reshard(str(tmp_path / "d.tsv"), str(out), per_shard=70)
    assert f"removed {dead}" in capsys.readouterr().err
    assert not list(out.glob(".reshard-*")) and (out / "sizes.json").is_file()
