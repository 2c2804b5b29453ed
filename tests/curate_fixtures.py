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
