"""Evaluation split across ranks (2 real gloo processes): the figures equal a single process's, and a set whose
image fails to decode on one rank's share is reported on rank 0 while the other sets are still scored."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_root, write_color_splits

WORKER = r"""
import json, sys, torch, torch.distributed as dist
rank, world, port, model_json, out, on_error = sys.argv[1:7]
sets = json.loads(sys.argv[7])
torch.set_num_threads(1)
if int(world) > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=int(world))
from vlp.eval import evaluate
from vlp.models import create_model
torch.manual_seed(0)
b = create_model(model_json)
res = evaluate(b.model, b.tokenizer, b.preprocess_val, sets, distributed=int(world) > 1, on_error=on_error,
               feature_cache=False)
for r in res:
    r.get("vlp", {}).pop("seconds", None)
json.dump(res, open(f"{out}.{rank}.json", "w"))
if int(world) > 1:
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world, model_json, sets, out, on_error="raise"):
    env = dict(os.environ, PYTHONPATH=str(repo_root()), OMP_NUM_THREADS="1")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(world), port, model_json, str(out), on_error,
                               json.dumps(sets)], env=env, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    return write_color_splits(tmp_path_factory.mktemp("dprobe"), test=40, train=60)


def test_two_ranks_give_the_single_process_figures(demo_data, micro_model_json, probe_root, tmp_path):
    sets = demo_data["eval_data"][:4] + [f"{probe_root}?task=knn"]
    (single,) = _run(1, micro_model_json, sets, tmp_path / "one")
    rank0, rank1 = _run(2, micro_model_json, sets, tmp_path / "two")
    assert rank1 == []                                     # metrics are computed once, on rank 0
    assert [r["dataset"] for r in rank0] == [r["dataset"] for r in single]
    for a, b in zip(rank0, single):
        assert a["vlp"].pop("world_size") == 2
        assert a["vlp"] == b["vlp"]
        for k, v in b["metrics"].items():
            if k.startswith("geometry/"):
                assert a["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["dataset"], k)
            else:
                assert a["metrics"][k] == pytest.approx(v, abs=1e-9), (a["dataset"], k)


def test_a_corrupt_image_on_one_rank_is_counted_and_a_failed_set_reported(demo_data, micro_model_json, tmp_path):
    """Rank 1 gets the second half of the images; the last one is corrupt: it is left out and counted once the
    features are gathered. A set where no image decodes is reported, and the other sets are still scored."""
    from vlp.data import demo_world as W

    import random

    rng = random.Random(0)
    for name in ("bad", "none"):
        for c in ("red", "blue"):
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(4):
                data = W.encode_png(W.render(W.random_scene(rng), 32, rng)) if name == "bad" else b"not a png"
                (tmp_path / name / c / f"{i}.png").write_bytes(data)
    (tmp_path / "bad" / "red" / "3.png").write_bytes(b"not a png at all")   # classes sort blue, red: the last image
    sets = [f"{tmp_path / name}?classnames=folders&templates=simple" for name in ("bad", "none")]
    rank0, rank1 = _run(2, micro_model_json, sets + [demo_data["eval_data"][0]], tmp_path / "fail", on_error="record")
    assert rank1 == []
    skipped, err, ok = rank0
    assert skipped["dataset"] == "bad" and skipped["vlp"]["skipped_images"] == 1 and skipped["vlp"]["n_images"] == 7
    assert err["dataset"] == "none" and "no image of the set could be decoded" in err["error"]
    assert ok["dataset"] == "wds/demo_colors" and 0 <= ok["metrics"]["acc1"] <= 1
