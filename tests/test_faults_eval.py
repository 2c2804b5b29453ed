"""Faults in the in-loop evaluation (issue #11, item 2), injected and their outcome asserted:

- an `--eval-data` set that cannot be opened stops the run before step 1 with one line and exit status 2
  (it used to train to the end and then die with a traceback);
- an eval set whose image no longer decodes fails at the eval step without stopping training: the error is a
  row in metrics.jsonl and one line on stderr, the other sets are still scored, the run finishes and saves
  (it used to end the run with a traceback and no checkpoint).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

from tests.conftest import repo_root
from tests.test_train_loop import _flags


def _bad_image_folder(root):
    from vlp.data import demo_world as W

    rng = random.Random(0)
    for c in ("blue", "red"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_bytes(W.encode_png(W.render(W.random_scene(rng), 32, rng)))
    (root / "red" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)    # a PNG header, then nothing
    return f"{root}?classnames=folders&templates=simple&name=bad"


def _train_py(args):
    env = dict(os.environ, PYTHONPATH=str(repo_root()), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(repo_root() / "train.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_missing_eval_set_stops_before_step_one(demo_data, micro_model_json, tmp_path):
    r = _train_py(_flags(demo_data, micro_model_json, tmp_path, "missing", "--max-steps", "3",
                         "--eval-data", demo_data["eval_data"][0], str(tmp_path / "no_such_set")))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: --eval-data ") and "eval data not found" in lines[0]
    assert not (tmp_path / "missing").exists()               # nothing trained, no run folder


def test_malformed_eval_set_stops_before_step_one(demo_data, micro_model_json, tmp_path):
    bad = tmp_path / "wds_bad"
    (bad / "test").mkdir(parents=True)
    (bad / "test" / "nshards.txt").write_text("2\n")             # shards promised, none there
    (bad / "classnames.txt").write_text("a\nb\n")
    (bad / "zeroshot_classification_templates.txt").write_text("{c}\n")
    r = _train_py(_flags(demo_data, micro_model_json, tmp_path, "malformed", "--max-steps", "3",
                         "--eval-data", str(bad)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "shard missing" in r.stderr.strip().splitlines()[-1]


def test_eval_failing_mid_run_is_logged_and_training_goes_on(demo_data, micro_model_json, tmp_path, capfd):
    from vlp.config import parse_config
    from vlp.train.loop import train

    bad = _bad_image_folder(tmp_path / "bad")                  # one corrupt image: skipped and counted
    for png in sorted((tmp_path / "bad").rglob("*.png")):      # then none decodes: the set fails, the run goes on
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    one = _bad_image_folder(tmp_path / "one").replace("name=bad", "name=one")
    cfg = parse_config(_flags(demo_data, micro_model_json, tmp_path, "goes_on", "--max-steps", "6",
                              "--eval-every", "3", "--log-every", "3", "--eval-data", bad, demo_data["eval_data"][0],
                              one))
    result = train(cfg)                                        # no exception
    err = capfd.readouterr().err
    failures = [line for line in err.splitlines() if "failed:" in line]
    assert len(failures) == 2 and all("training goes on" in line and "cannot decode image" in line
                                      for line in failures), err
    rows = [json.loads(line) for line in (tmp_path / "goes_on" / "metrics.jsonl").read_text().splitlines()]
    errors = {r["step"]: r["eval/bad/error"] for r in rows if "eval/bad/error" in r}
    scored = {r["step"] for r in rows if "eval/wds/demo_colors/acc1" in r}
    assert sorted(errors) == [3, 6] and "no image of the set could be decoded" in errors[3]
    assert scored == {3, 6}                                    # the other set is still scored
    assert {r["step"]: r.get("eval/one/skipped_images") for r in rows if "eval/one/acc1" in r} == {3: 1, 6: 1}
    assert max(r["step"] for r in rows if "train/loss" in r) == 6
    assert (tmp_path / "goes_on" / "checkpoints" / "step_00000006.pt").is_file()
    assert result["eval/bad/error"] == errors[6]
