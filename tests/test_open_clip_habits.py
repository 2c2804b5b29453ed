"""open_clip and CLIP_benchmark habits: precision names, open_clip flags, CLIP_benchmark's eval flags."""
from __future__ import annotations

import json

import pytest
import torch

from vlp.config import ConfigError, parse_config

BASE = ["--train-data", "x/{0..1}.tar"]


def test_open_clip_aliases_map_exactly():
    cfg = parse_config(BASE + ["--siglip", "--log-every-n-steps", "7", "--delete-previous-checkpoint",
                               "--dataset-type", "webdataset", "--imagenet-val", "/data/imagenet/val"])
    assert cfg.loss.loss == "siglip" and cfg.run.log_every == 7 and cfg.run.keep_checkpoints == 1
    assert cfg.run.eval_data == ["/data/imagenet/val?name=imagenet-val&classnames=imagenet&templates=openai"]


@pytest.mark.parametrize("flag,answer", [
    (["--save-frequency", "1"], "--save-every"),
    (["--zeroshot-frequency", "2"], "--eval-every"),
    (["--val-data", "v.tar"], "--eval-data"),
    (["--val-frequency", "1"], "--eval-every"),
    (["--save-most-recent"], "latest"),
    (["--dataset-type", "csv"], "make_shards"),
])
def test_open_clip_flags_answer_with_vlp_equivalent(flag, answer):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + flag)
    assert answer in str(e.value) and "\n" not in str(e.value)


def test_every_open_clip_flag_and_typo_is_named_at_once():
    """A real open_clip command line: all of its answered flags and the typo in one line (was: the first only)."""
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + ["--save-frequency", "1", "--zeroshot-frequency", "2", "--val-data", "v.tar",
                             "--batch-szie", "32"])
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in ("--save-every", "--eval-every", "--eval-data"))
    assert "--batch-szie (did you mean --batch-size?)" in msg


def test_precision_names():
    for name in ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32", "auto"):
        assert parse_config(BASE + ["--precision", name]).run.precision == name
    with pytest.raises(ConfigError, match="--precision must be one of"):
        parse_config(BASE + ["--precision", "fp8"])


@pytest.mark.parametrize("name", ["bf16", "fp16", "pure_bf16", "pure_fp16"])
def test_weight_casts_match_open_clip(name, micro_model_json):
    """vlp's cast of each 16-bit name leaves every parameter in the dtype open_clip's own
    create_model(precision=name) gives it."""
    import open_clip

    from vlp import precision as prec
    from vlp.models import create_model

    ours = prec.cast_model(create_model(micro_model_json).model, name)
    theirs = open_clip.create_model("vlp-micro", precision=name)
    want = {k: v.dtype for k, v in theirs.state_dict().items()}
    got = {k: v.dtype for k, v in ours.state_dict().items()}
    assert got == want
    assert len(set(got.values())) == (1 if name.startswith("pure_") else 2)


def test_precision_mapping_to_accelerate():
    from vlp import precision as prec

    assert prec.resolve("auto", "cpu") == "fp32" and prec.resolve("auto", "cuda") == "amp"
    assert [prec.accelerate_mixed_precision(n) for n in ("amp", "amp_bf16", "bf16", "pure_bf16", "fp32")] == \
        ["fp16", "bf16", "no", "no", "no"]
    assert prec.cpu_warning("fp32", "cpu") is None and prec.cpu_warning("amp_bf16", "cuda") is None
    assert "slower" in prec.cpu_warning("amp_bf16", "cpu") and "fp32" in prec.cpu_warning("amp", "cpu")
    assert "samples/s" not in prec.cpu_warning("bf16", "cpu")     # no figure that was not measured (was: 9 vs 66)


def test_eval_accepts_clip_benchmark_flags(demo_data, micro_model_json, tmp_path):
    """`--dataset wds/NAME --dataset_root 'ROOT/{dataset}' --task T` scores the same sets as `--data ROOT/NAME`,
    names them as CLIP_benchmark does, and --precision takes open_clip's names."""
    import eval_zeroshot

    root = str(demo_data["eval_data"][0]).rsplit("/", 1)[0]
    common = ["--model", micro_model_json, "--quiet", "--batch_size", "64"]
    torch.manual_seed(0)
    assert eval_zeroshot.main(["--data", f"{root}/demo_colors", "--output", str(tmp_path / "a")] + common) == 0
    torch.manual_seed(0)
    assert eval_zeroshot.main(["--dataset", "wds/demo_colors", "wds/demo_retrieval", "--dataset_root",
                               root + "/{dataset}", "--task", "auto", "--output", str(tmp_path / "b"),
                               "--recall_k", "1", "5", "--no_amp"] + common) == 0
    a = [json.loads(p.read_text()) for p in sorted((tmp_path / "a").glob("*.json"))]
    b = {json.loads(p.read_text())["dataset"]: json.loads(p.read_text()) for p in (tmp_path / "b").glob("*.json")}
    assert set(b) == {"wds/demo_colors", "wds/demo_retrieval"}
    assert b["wds/demo_retrieval"]["task"] == "zeroshot_retrieval"
    assert b["wds/demo_colors"]["metrics"]["acc1"] == a[0]["metrics"]["acc1"]
    # --task forces the task; a non-wds name with a root is one line (vlp downloads nothing)
    assert eval_zeroshot.main(["--dataset", "wds/demo_retrieval", "--dataset_root", root + "/{dataset}",
                               "--task", "zeroshot_classification", "--output", str(tmp_path / "c")] + common) == 2
    assert eval_zeroshot.main(["--dataset", "cifar10", "--dataset_root", root, "--output", str(tmp_path / "d")]
                              + common) == 2
    torch.manual_seed(0)
    assert eval_zeroshot.main(["--data", f"{root}/demo_colors", "--precision", "pure_bf16",
                               "--output", str(tmp_path / "e")] + common) == 0
    e = json.loads(next((tmp_path / "e").glob("*.json")).read_text())
    assert abs(e["metrics"]["acc1"] - a[0]["metrics"]["acc1"]) < 0.2
