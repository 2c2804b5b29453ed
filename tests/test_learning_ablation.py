"""benchmarks/learning_ablation: paired effects per seed, checked against figures worked out by hand."""
import json

import pytest

from benchmarks import learning_ablation as la


def _rec(contender, seed, styles, recipe=None):
    return {"contender": contender, "recipe": recipe or contender, "seed": seed,
            "vlp": {"styles": styles, "gap": 0.5}}


def _records():
    ref = [0.10, 0.20, 0.30, 0.40, 0.50]
    recs = [_rec("clip", s, v) for s, v in enumerate(ref)]
    # +1, +2, +3, +4 points on seeds 0-3; seed 4 not run; seed 9 has no pair
    recs += [_rec("clip-b2", s, ref[s] + d / 100) for s, d in enumerate([1, 2, 3, 4])] + [_rec("clip-b2", 9, 0.9)]
    recs += [_rec("clip-same", s, v) for s, v in enumerate(ref)]
    recs += [_rec("open_clip_train", 0, 0.2, BASE := "open_clip_train"), _rec("again", 1, 0.4, BASE)]
    return recs


def test_paired_difference_and_tests_match_hand_figures():
    runs = la.by_contender(_records())
    st = la.paired(runs["clip"], runs["clip-b2"], "styles")
    assert st["n"] == 4 and (st["wins"], st["losses"], st["ties"]) == (4, 0, 0)
    assert st["diff"] == pytest.approx(2.5) and st["diff_std"] == pytest.approx(1.2910, abs=1e-4)
    # t = 2.5 / (1.2910 / 2) = 3.873 on 3 degrees of freedom; exact Wilcoxon with 4 positive ranks: 2 / 2**4
    assert st["t_p"] == pytest.approx(0.0305, abs=5e-4)
    assert st["wilcoxon_p"] == pytest.approx(0.125)
    same = la.paired(runs["clip"], runs["clip-same"], "styles")
    assert (same["ties"], same["t_p"], same["wilcoxon_p"]) == (5, 1.0, 1.0)


def test_one_seed_that_moved_among_ties_still_gets_a_paired_t():
    ref = {s: {"styles": 0.10} for s in range(4)}
    other = {**ref, 3: {"styles": 0.14}}  # +4 points on one seed of four: diffs 0, 0, 0, 4
    st = la.paired(ref, other, "styles")
    # mean 1, std 2, t = 1 / (2 / 2) = 1 on 3 degrees of freedom: two-sided p 0.391
    assert (st["wins"], st["ties"]) == (1, 3) and st["t_p"] == pytest.approx(0.391, abs=1e-3)
    assert st["wilcoxon_p"] == 1.0


def test_tables_pool_every_open_clip_train_label_and_skip_the_gap(tmp_path, capsys):
    out = tmp_path / "l.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    assert la.main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| clip-b2 | 4 | styles | 40.0 ± 30.5 | +2.50 ± 1.29 | 4/0/0 | 0.030 | 0.125 |" in text
    assert "2 runs pooled" in text and "gap" not in text and "| again |" not in text
    # clip's mean 30.0 against the pool's (20 + 40) / 2
    assert "| clip | 5 | 1.00x" in text
    assert la.main(["--out", str(out), "--reference", "nope"]) == 2
