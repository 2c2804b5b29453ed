"""benchmarks/learning.py's bookkeeping: contender specs, the commands each contender runs, and the table."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import learning as L


def test_contender_specs_and_commands():
    assert L.parse_contender("clip") == ("clip", "clip", [])
    assert L.parse_contender("clip-b2=clip:--beta2 0.999 --eps 1e-8") == ("clip-b2", "clip",
                                                                         ["--beta2", "0.999", "--eps", "1e-8"])
    cmd, env = L.train_command("laclip", ["--decay-embeddings"], "s/{0..1}.tar", 3, Path("logs"), "x", L.BUDGET)
    assert env == {"VLP_BENCH_DECAY_EMBEDDINGS": "1"} and "--decay-embeddings" not in cmd
    assert cmd[cmd.index("--config") + 1].endswith("configs/laclip.yaml")
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd[cmd.index("--lr") + 1] == "0.001"
    base, env = L.train_command(L.BASELINE, [], "s/{0..1}.tar", 3, Path("logs"), "x", L.BUDGET)
    assert env == {} and base[base.index("--dataset-type") + 1] == "webdataset"
    # the same budget flags reach both trainers
    flags = L._flags(L.BUDGET)
    assert all(f in cmd and f in base for f in flags)


def test_recipe_configs_parse_into_valid_runs():
    from vlp.config import parse_config

    for r in L.RECIPES:
        cfg = parse_config(["--config", str(L.ROOT / "configs" / f"{r}.yaml"), "--train-data", "x.tar"])
        assert cfg.model.model == "vlp-icon" and cfg.data.batch_size == 128
    assert parse_config(["--config", str(L.ROOT / "configs/siglip.yaml"), "--train-data", "x.tar"]).loss.loss == "siglip"


def test_table_mean_std_and_ratio():
    def rec(c, seed, x, t):
        return {"contender": c, "seed": seed, "train_s": t, "vlp": {f: x for f in L.FIGURES if f != "val"}}

    recs = [rec(L.BASELINE, 0, 0.10, 100), rec(L.BASELINE, 1, 0.20, 100), rec("clip", 0, 0.30, 50), rec("clip", 1, 0.30, 50)]
    t = L.table(recs).splitlines()
    assert t[2].startswith(f"| {L.BASELINE} | 0,1 | 15.0 ± 7.1 |")
    assert t[3].startswith("| clip | 0,1 | 30.0 ± 0.0 (2.00x) |") and t[3].endswith("50 ± 0 (0.50x) | 5/5 |")
    recs += [rec("low", 0, 0.08, 50), rec("low", 1, 0.08, 50), rec("lower", 0, 0.07, 50), rec("lower", 1, 0.07, 50)]
    t = L.table(recs).splitlines()   # baseline 15.0 ± 7.1: 8.0 is within one std, 7.0 is not
    assert t[4].endswith(" | 5/5 |") and t[5].endswith(" | 0/5 |") and t[2].endswith(" |  |")
    # a second draw of open_clip_train (its shuffle is unseeded): the baseline is both draws pooled
    recs += [{**rec("again", s, x, 100), "recipe": L.BASELINE} for s, x in ((0, 0.30), (1, 0.40))]
    t = L.table(recs).splitlines()   # pool 0.1, 0.2, 0.3, 0.4: 25.0 ± 12.9
    assert t[-1].startswith(f"| {L.BASELINE}, all 4 runs | 0,1,0,1 | 25.0 ± 12.9 |") and t[-1].endswith(" |  |")
    assert t[2].startswith(f"| {L.BASELINE} | 0,1 | 15.0 ± 7.1 (0.60x) |") and t[2].endswith(" | 5/5 |")
    assert t[3].startswith("| clip | 0,1 | 30.0 ± 0.0 (1.20x) |") and t[4].endswith(" | 0/5 |")  # 8.0 < 25.0 - 12.9


def test_figures_come_from_the_bench_and_val_is_a_column_where_scored(tmp_path):
    def bench(*names):
        (tmp_path / "splits.json").write_text(json.dumps({"eval": {n: {} for n in names}}))
        return L.bench_sets(tmp_path)

    icons = bench("icons_unseen_concepts", "icons_unseen_styles", "icons_category", "icons_retrieval")
    assert icons == ("icons", {"concepts": "icons_unseen_concepts", "styles": "icons_unseen_styles",
                               "category": "icons_category", "retrieval": "icons_retrieval"})
    kind, sets = bench("glyphs_val", "glyphs_unseen_concepts", "glyphs_unseen_styles", "glyphs_category",
                       "glyphs_retrieval")
    assert kind == "glyphs" and sets["val"] == "glyphs_val" and sets["styles"] == "glyphs_unseen_styles"
    recs = [{"contender": c, "seed": 0, "train_s": 1, "vlp": {f: x for f in L.FIGURES}}
            for c, x in ((L.BASELINE, 0.1), ("clip", 0.2))]
    head, _, base, clip = L.table(recs).splitlines()
    assert head.split(" | ")[2:4] == ["val", "concepts"] and clip.endswith(" | 6/6 |")   # val counts in parity
    recs = [{**r, "vlp": {k: v for k, v in r["vlp"].items() if k != "val"}} for r in recs]
    assert "val" not in L.table(recs).splitlines()[0]                                   # the icon bench has none


def test_decay_embeddings_ablation_decays_what_open_clip_decays(monkeypatch):
    import vlp.train.optim as optim
    from vlp.models import create_model

    model = create_model("vlp-tiny").model
    _, spared = optim.split_decay(model)
    assert {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"} <= set(spared)
    monkeypatch.setattr(optim, "no_decay_reason", optim.no_decay_reason)  # restored after the test
    L.decay_embeddings()
    decayed, spared = optim.split_decay(model)
    # open_clip_train's rule: no decay iff ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in the name
    expect = {n for n, p in model.named_parameters()
              if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}
    assert set(spared) == expect and "token_embedding.weight" in decayed


def test_open_clip_train_refusing_a_run_folder_is_a_failed_run(tmp_path):
    """open_clip_train returns -1 (exit 0) when --name exists; the benchmark once scored the stale
    checkpoint a killed run had left there as if it were the finished model."""
    import subprocess
    import sys

    from benchmarks.learning import _OPEN_CLIP_MAIN, ROOT

    (tmp_path / "x" / "checkpoints").mkdir(parents=True)
    (tmp_path / "x" / "checkpoints" / "epoch_1.pt").write_bytes(b"stale")
    (tmp_path / "x" / "out.log").write_text("Start epoch 1\n")        # what open_clip_train checks
    p = subprocess.run([sys.executable, "-c", _OPEN_CLIP_MAIN, "--logs", str(tmp_path), "--name", "x",
                        "--model", "vlp-icon", "--report-to", ""], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1, p.stdout[-500:] + p.stderr[-500:]
    assert "already exists" in p.stdout + p.stderr
