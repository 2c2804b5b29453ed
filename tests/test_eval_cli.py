"""End-to-end evaluation: the API on every dataset kind, checkpoints of both formats, run folders, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data_tools.make_demo_data import write_classification, write_retrieval
from vlp.data import demo_world as W

import eval_zeroshot

SCHEMA = {"dataset", "model", "pretrained", "task", "metrics", "language"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalsets")
    write_classification(root / "colors", "color", 320, 32, seed=1, per_shard=100)     # 8 balanced classes, 4 shards
    write_retrieval(root / "scenes", 60, 32, seed=2, per_shard=1000)
    # an image folder with class sub-folders, and a CSV + a JSONL of image paths with captions
    rng = __import__("random").Random(0)
    folder = root / "folder"
    for c in ("circle", "square", "triangle"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            W.render([W.Thing("red", c, "large", "center")], 32, rng).save(folder / c / f"{i}.png")
    imgs = root / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(12):
        things = W.random_scene(rng)
        W.render(things, 32, rng).save(imgs / f"{i}.png")
        rows.append((f"imgs/{i}.png", W.phrasings(things, rng)[1:3]))
    (root / "caps.csv").write_text("image,caption\n" + "".join(f"{p},{c}\n" for p, cs in rows for c in cs))
    (root / "caps.jsonl").write_text("".join(json.dumps({"image": p, "captions": cs}) + "\n" for p, cs in rows))
    return {k: str(root / k) for k in ("colors", "scenes", "folder", "caps.csv", "caps.jsonl")} | {"root": root}


@pytest.fixture(scope="module")
def micro(micro_model_json):
    from vlp.models import create_model

    torch.manual_seed(0)
    return create_model(micro_model_json)


def test_api_all_dataset_kinds_and_chance_level(micro, sets):
    from vlp.eval import evaluate

    micro.model.train()
    res = evaluate(micro.model, micro.tokenizer, micro.preprocess_val,
                   [sets["colors"], sets["scenes"], sets["folder"] + "?classnames=folders&templates=simple",
                    sets["caps.csv"], sets["caps.jsonl"] + "?name=caps_jsonl"],
                   batch_size=64, model_name="vlp-micro", pretrained="random", per_class=True)
    assert micro.model.training                       # the trainer's mode is restored
    assert [r["dataset"] for r in res] == ["wds/colors", "wds/scenes", "folder", "caps", "caps_jsonl"]
    assert [r["task"] for r in res] == ["zeroshot_classification", "zeroshot_retrieval", "zeroshot_classification",
                                        "zeroshot_retrieval", "zeroshot_retrieval"]
    for r in res:
        assert SCHEMA <= set(r) and r["model"] == "vlp-micro" and r["language"] == "en"
        assert all(k.startswith("geometry/") for k in r["metrics"] if "/" in k and "@" not in k)
        assert 0 <= r["metrics"]["geometry/modality_gap"] <= 2
    colors = res[0]["metrics"]
    # random weights on a balanced 8-class set: chance level (1/8), whatever the model happens to prefer
    assert abs(colors["acc1"] - 1 / 8) < 0.09 and abs(colors["mean_per_class_recall"] - 1 / 8) < 0.09
    assert colors["acc5"] > colors["acc1"]
    assert math.isnan(res[2]["metrics"]["acc5"])       # 3 classes: no top-5, as CLIP_benchmark
    assert res[1]["vlp"]["n_texts"] == 180 and res[1]["vlp"]["n_images"] == 60
    assert res[3]["metrics"] == res[4]["metrics"]      # CSV and JSONL of the same captions agree
    assert res[3]["vlp"]["n_texts"] == 24
    assert set(res[0]["per_class"]["accuracy"]) == set(W.COLORS)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@10", "image_retrieval_median_rank"):
        assert key in res[1]["metrics"]


def _vlp_checkpoint(bundle, path: Path, step: int) -> None:
    """A checkpoint in train.py's format (vlp.runtime.checkpoint.save_checkpoint when available)."""
    from vlp.models import model_identity

    state = {"model": bundle.model.state_dict(), "step": step, "epoch": 0, **model_identity(bundle, None)}
    try:
        from vlp.runtime.checkpoint import save_checkpoint
    except ImportError:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / f"step_{step:08d}.pt")
        return
    save_checkpoint(path, step, state, keep=10)


def test_run_folder_and_open_clip_checkpoint(micro, sets, tmp_path, capsys):
    run = tmp_path / "run"
    _vlp_checkpoint(micro, run / "checkpoints", 10)
    with torch.no_grad():
        for p in micro.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _vlp_checkpoint(micro, run / "checkpoints", 20)
    rc = eval_zeroshot.main(["--checkpoint", str(run), "--data", sets["colors"], sets["scenes"], "--quiet",
                             "--workers", "0", "--batch-size", "128"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "step 10" in table and "step 20" in table and "wds/colors" in table
    files = sorted(p.name for p in (run / "eval").iterdir())
    assert "metrics_vs_step.png" in files and len(files) == 5
    res = [json.loads((run / "eval" / f).read_text()) for f in files if f.endswith(".json")]
    assert all(SCHEMA <= set(r) and r["model"] == "vlp-micro" for r in res)
    assert sorted(r["vlp"]["step"] for r in res) == [10, 10, 20, 20]

    # the step-20 weights as an open_clip file, given with its model name: same numbers as the vlp checkpoint
    oc = tmp_path / "oc.pt"
    torch.save({"state_dict": micro.model.state_dict()}, oc)
    out = tmp_path / "oc_out"
    rc = eval_zeroshot.main(["--checkpoint", str(oc), "--model", "vlp-micro", "--data", sets["colors"], "--quiet",
                             "--workers", "0", "--output", str(out)])
    assert rc == 0
    (oc_res,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    (step20,) = [r for r in res if r["vlp"]["step"] == 20 and r["dataset"] == "wds/colors"]
    assert oc_res["pretrained"] == str(oc)
    assert oc_res["metrics"] == step20["metrics"]


def _fails(argv, capsys, out_dir: Path) -> str:
    rc = eval_zeroshot.main(argv + ["--quiet", "--workers", "0", "--output", str(out_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out_dir.exists() or not any(out_dir.iterdir())     # nothing (half-)written
    return err


def test_bad_input(micro, micro_model_json, sets, tmp_path, capsys):
    import shutil

    root = Path(sets["root"])
    args = ["--model", micro_model_json]
    # missing class names
    nocls = tmp_path / "nocls"
    shutil.copytree(sets["colors"], nocls)
    (nocls / "classnames.txt").unlink()
    assert "class names" in _fails(args + ["--data", str(nocls)], capsys, tmp_path / "o1")
    # image folder without any class names source
    assert "class names" in _fails(args + ["--data", str(root / "folder")], capsys, tmp_path / "o2")
    # empty set
    empty = tmp_path / "empty"
    shutil.copytree(sets["colors"], empty)
    for t in (empty / "test").glob("*.tar"):
        t.unlink()
    import tarfile

    for i in range(4):
        tarfile.open(empty / "test" / f"{i}.tar", "w").close()
    assert "empty" in _fails(args + ["--data", str(empty)], capsys, tmp_path / "o3")
    # an image that will not decode (a good set first: its results must not be written either)
    bad = tmp_path / "badimg"
    (bad / "c").mkdir(parents=True)
    (bad / "c" / "x.png").write_bytes(b"not a png at all")
    (bad / "classnames.txt").write_text("circle\n")
    err = _fails(args + ["--data", sets["colors"], str(bad)], capsys, tmp_path / "o4")
    assert "cannot decode image" in err and "x.png" in err
    # a checkpoint of another architecture
    other = tmp_path / "other.pt"
    torch.save({"state_dict": micro.model.state_dict()}, other)
    assert "does not fit" in _fails(["--checkpoint", str(other), "--model", "vlp-tiny",
                                     "--data", sets["colors"]], capsys, tmp_path / "o5")
    # an open_clip file without a model name; a path that does not exist
    assert "--model" in _fails(["--checkpoint", str(other), "--data", sets["colors"]], capsys, tmp_path / "o6")
    assert "not found" in _fails(args + ["--data", str(tmp_path / "nope")], capsys, tmp_path / "o7")
    # a template file that is not JSON
    (tmp_path / "t.json").write_text("{not json")
    assert "not valid JSON" in _fails(args + ["--data", sets["colors"] + f"?templates={tmp_path / 't.json'}"], capsys,
                                      tmp_path / "o8")


def test_open_clip_train_run_folder_is_scored_by_epoch(micro, sets, tmp_path, capsys):
    run = tmp_path / "oc_run"
    (run / "checkpoints").mkdir(parents=True)
    state = {f"module.{k}": v for k, v in micro.model.state_dict().items()}     # as DDP training saves it
    for epoch in (1, 2):
        torch.save({"epoch": epoch, "name": "oc_run", "state_dict": state}, run / "checkpoints" / f"epoch_{epoch}.pt")
    torch.save({"epoch": 2, "name": "oc_run", "state_dict": state}, run / "checkpoints" / "epoch_latest.pt")
    rc = eval_zeroshot.main(["--checkpoint", str(run), "--model", "vlp-micro", "--data", sets["colors"], "--quiet",
                             "--workers", "0"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "epoch 1" in table and "epoch 2" in table and "latest" not in table
    res = [json.loads(p.read_text()) for p in (run / "eval").glob("*.json")]
    assert sorted(r["vlp"]["epoch"] for r in res) == [1, 2] and all("step" not in r["vlp"] for r in res)
    assert (run / "eval" / "metrics_vs_step.png").is_file()
    assert res[0]["metrics"] == res[1]["metrics"]                               # same weights, same numbers


def test_corrupt_images_are_skipped_and_counted(micro, sets, tmp_path):
    """A corrupt image in a set is left out and counted (as training skips it), for every task kind; the other
    images are scored as without it, and the result JSON says how many and why."""
    import shutil

    from vlp.eval import evaluate

    good = tmp_path / "good"
    shutil.copytree(sets["folder"], good)
    bad = tmp_path / "bad"
    shutil.copytree(sets["folder"], bad)
    png = (bad / "square" / "0.png").read_bytes()
    (bad / "square" / "zz.png").write_bytes(png[:len(png) // 2])        # a PNG cut in half
    caps = Path(sets["caps.csv"]).read_text() + "imgs/missing.png,a caption of no image\n"
    (Path(sets["root"]) / "caps_missing.csv").write_text(caps)
    spec = "?classnames=folders&templates=simple"
    kw = dict(batch_size=4, geometry=False)
    ref = evaluate(micro.model, micro.tokenizer, micro.preprocess_val, [str(good) + spec, sets["caps.csv"]], **kw)
    got = evaluate(micro.model, micro.tokenizer, micro.preprocess_val,
                   [str(bad) + spec, str(Path(sets["root"]) / "caps_missing.csv")], **kw)
    for r, g in zip(ref, got):
        assert json.dumps(g["metrics"]) == json.dumps(r["metrics"]) and "skipped_images" not in r["vlp"]
        assert g["vlp"]["skipped_images"] == 1 and g["vlp"]["n_images"] == r["vlp"]["n_images"]
    assert got[0]["vlp"]["skipped"] == {"corrupt_image": 1} and "zz.png" in got[0]["vlp"]["skipped_first"]
    assert got[1]["vlp"]["skipped"] == {"missing_image": 1}


def test_run_plot_uses_in_loop_evals_and_skips_single_points():
    """One scored checkpoint + in-loop evaluations every 50 steps in metrics.jsonl: the eval panels follow the
    in-loop points, every panel shares the step axis, and a figure with one point has no panel."""
    from vlp.eval.plot import draw
    from vlp.eval.report import progress

    results = [{"dataset": "wds/c", "task": "zeroshot_classification", "metrics": {"acc1": 0.5, "acc5": 0.9},
                "vlp": {"step": 200, "n_classes": 8, "n_images": 80}}]
    rows = [(s, {"eval/wds/c/acc1": s / 400, "eval/wds/c/geometry/modality_gap": 0.5}) for s in (50, 100, 150, 200)]
    fig = draw(results, [(1, 5.0), (100, 4.0), (200, 3.5)], progress, rows)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["training loss", "acc1", "geometry/modality_gap"]
    (line,) = [ln for ln in axes[1].get_lines() if ln.get_linestyle() != "--"]
    assert list(line.get_xdata()) == [50, 100, 150, 200] and line.get_ydata()[-1] == 0.5   # the checkpoint wins
    assert all(ax.get_shared_x_axes().joined(axes[0], ax) for ax in axes)
    assert draw(results, [(1, 5.0)], progress) is None          # one checkpoint, one loss point: nothing to plot
