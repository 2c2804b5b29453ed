"""Fixtures shared by the curation tests: the demo shards and their embed tables (single-process reference)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_root


def vlp_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "vlp", "data", *args]


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(vlp_cmd(*args), capture_output=True, text=True, cwd=repo_root(), **kw)


@pytest.fixture(scope="module")
def shards(demo_data) -> list[str]:
    from vlp.data.shards import shard_urls

    urls = shard_urls(demo_data["train_data"])
    assert len(urls) >= 3
    return urls


@pytest.fixture(scope="module")
def reference(shards, micro_model_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "emb"
    r = run("embed", "--data", "::".join(shards), "--model", micro_model_json, "--out", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    return out


FILTER_FLAGS = ["--min-words", "2", "--max-caption-repeats", "4", "--min-side", "30", "--max-aspect", "3",
                "--dedup-image", "--dedup-pair", "--top-fraction", "0.8", "--semdedup-eps", "0.0001",
                "--semdedup-clusters", "6", "--balance-t", "40", "--seed", "3"]


def make_curation_pool(demo_train: str, micro_model_json: str, base: Path) -> dict:
    """A noisy pool (`vlp data make-noisy-pool`: mismatched pairs, boilerplate, near-duplicates) of the demo
    shards, a shard of planted exact copies (same bytes; half with the same caption), its embed tables and a
    MetaCLIP entry list; -> {"emb", "entries", "flags", "shards"}."""
    import json

    from data_tools.make_noisy_pool import make_noisy_pool
    from vlp.data.shards import shard_urls
    from vlp.data.tario import ShardWriter, read_shard

    stats = make_noisy_pool(demo_train, str(base / "pool"), mismatched=0.2, near_dups=0.3, boilerplate=0.15,
                            seed=0, per_shard=150)
    urls = shard_urls(stats["train_data"])
    first = list(read_shard(urls[0]))[:40]
    with ShardWriter(str(base / "pool" / "copies.tar"), 1000) as w:
        for i, s in enumerate(first):
            txt = s.files["txt"] if i % 2 else b"another caption for the same picture " + str(i).encode()
            w.write(f"copy{i:04d}", {"jpg": s.files["jpg"], "txt": txt, "json": json.dumps({}).encode()})
    urls.append(str(base / "pool" / "copies.tar"))
    words = sorted({w for s in first for w in s.files["txt"].decode().lower().split() if w.isalpha()})
    (base / "entries.txt").write_text("\n".join(words[:12]) + "\n")
    emb = base / "emb"
    r = run("embed", "--data", "::".join(urls), "--model", micro_model_json, "--out", str(emb), "--threads", "1")
    assert r.returncode == 0, r.stderr
    return {"emb": emb, "entries": base / "entries.txt", "shards": urls,
            "flags": FILTER_FLAGS + ["--balance", str(base / "entries.txt")]}


@pytest.fixture(scope="session")
def curation_pool(demo_data, micro_model_json, tmp_path_factory) -> dict:
    return make_curation_pool(demo_data["train_data"], micro_model_json, tmp_path_factory.mktemp("noisy"))
