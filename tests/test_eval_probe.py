"""Linear probe against scikit-learn's LogisticRegression, k-NN against brute force, the float16 feature cache,
and both tasks end to end on a wds set with train and test splits."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlp.eval import features as FC
from vlp.eval.knn import knn_metrics, knn_predict
from tests.conftest import write_color_splits
from vlp.eval.probe import LAMBDAS, fit_logistic, linear_probe, select_lambda, stratified_split

sklearn_lm = pytest.importorskip("sklearn.linear_model")


def _blobs(n, n_classes=8, d=32, seed=0, spread=0.35):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n_classes, d, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = F.normalize(mu[y] * spread + torch.randn(n, d, generator=g) / d ** 0.5 * 1.2, dim=-1)
    return x, y


def _sklearn(x, y, lam):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sklearn_lm.LogisticRegression(C=1.0 / (lam * len(y)), tol=1e-8, max_iter=10_000).fit(x.numpy(), y.numpy())


@pytest.mark.parametrize("lam", [1e-4, 1e-2])
def test_fit_equals_sklearn_logistic_regression(lam):
    x, y = _blobs(600)
    xt, yt = _blobs(400, seed=1)
    ours = fit_logistic(x, y, 8, lam, tol=1e-7)
    sk = _sklearn(x, y, lam)
    p_ours = torch.softmax(ours.logits(xt), 1).numpy()
    p_sk = sk.predict_proba(xt.numpy())
    assert np.abs(p_ours - p_sk).max() < 2e-3
    agree = (p_ours.argmax(1) == p_sk.argmax(1)).mean()
    assert agree >= 0.995


def test_probe_with_search_within_half_a_point_of_sklearn():
    """The whole protocol (held-out split, coarse-to-fine search, refit on all train) against the same
    protocol run with scikit-learn's solver."""
    x, y = _blobs(900, seed=2)
    xt, yt = _blobs(600, seed=3)
    ours, info = linear_probe(x, y, xt, yt, 8, seed=0)
    fit, held = stratified_split(y, 0.2, 0)
    cache = {}

    def acc(i):
        if i not in cache:
            cache[i] = sk_fit = _sklearn(x[fit], y[fit], LAMBDAS[i])
            cache[i] = (sk_fit.predict(x[held].numpy()) == y[held].numpy()).mean()
        return cache[i]

    best = max(range(96, -1, -16), key=acc)
    step = 8
    while step:
        best = max([best] + [i for i in (best + step, best - step) if 0 <= i < 97], key=acc)
        step //= 2
    sk = _sklearn(x, y, LAMBDAS[best])
    sk_acc = (sk.predict(xt.numpy()) == yt.numpy()).mean()
    assert abs(ours["lp_acc1"] - sk_acc) <= 0.005
    assert 0.3 < ours["lp_acc1"] < 1.0              # neither trivial nor saturated
    assert info["lambdas_fitted"] <= 15 and ours["lp_l2_lambda"] in LAMBDAS
    assert set(ours) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "lp_l2_lambda"}


def test_fewshot_uses_k_per_class():
    x, y = _blobs(500, seed=4, spread=0.12)
    xt, yt = _blobs(300, seed=5, spread=0.12)
    m, info = linear_probe(x, y, xt, yt, 8, fewshot_k=4, seed=1)
    assert info["n_train"] == 32 and info["fewshot_k"] == 4
    full, _ = linear_probe(x, y, xt, yt, 8, seed=1)
    assert m["lp_acc1"] < full["lp_acc1"]
    with pytest.raises(ValueError, match="few-shot"):
        linear_probe(x, y, xt, yt, 8, fewshot_k=1000)


def test_search_is_refused_without_held_out_data():
    x, y = _blobs(8, seed=6)
    y = torch.arange(8)
    with pytest.raises(ValueError, match="held-out"):
        linear_probe(x, y, x, y, 8)


def _brute_knn(tx, ty, x, n_classes, k, T=0.07):
    tx, x = F.normalize(tx, dim=-1).numpy().astype(np.float64), F.normalize(x, dim=-1).numpy().astype(np.float64)
    preds = []
    for q in x:
        sims = tx @ q
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = np.zeros(n_classes)
        for j in order:
            votes[int(ty[j])] += np.exp(sims[j] / T)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_knn_equals_brute_force():
    tx, ty = _blobs(300, seed=7, spread=0.1)
    x, y = _blobs(120, seed=8, spread=0.1)
    preds = knn_predict(tx, ty, x, 8, ks=(1, 10, 20), chunk=17)
    ours = knn_metrics(tx, ty, x, y, 8, ks=(1, 10, 20))
    for k in (1, 10, 20):
        exp = _brute_knn(tx, ty, x, 8, k)
        assert preds[k].tolist() == exp.tolist()
        assert ours[f"knn_acc1@{k}"] == pytest.approx((exp == y.numpy()).mean(), abs=1e-6)
    assert len({ours["knn_acc1@1"], ours["knn_acc1@10"], ours["knn_acc1@20"]}) > 1


# --------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def probe_set(tmp_path_factory):
    """A CLIP_benchmark wds root with `train` (96 images) and `test` (48) splits of the demo colours."""
    return write_color_splits(tmp_path_factory.mktemp("probe"), test=48, train=96)


def test_probe_and_knn_end_to_end_with_feature_cache(probe_set, micro_model_json, tmp_path):
    from vlp.eval import evaluate
    from vlp.models import create_model

    torch.manual_seed(0)
    b = create_model(micro_model_json)
    specs = [f"{probe_set}?task=linear_probe", f"{probe_set}?task=knn&name=colors_knn"]
    cache = tmp_path / "features"
    first = evaluate(b.model, b.tokenizer, b.preprocess_val, specs, feature_cache=str(cache))
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2                             # one per split, shared by both tasks
    saved = torch.load(files[0], weights_only=True)
    assert saved["features"].dtype == torch.float16
    lp, knn = (r["metrics"] for r in first)
    assert 0 <= lp["lp_acc1"] <= 1 and set(knn) == {"knn_acc1@1", "knn_acc1@10", "knn_acc1@20"}
    assert first[0]["vlp"]["n_train"] == 96 and first[0]["vlp"]["n_images"] == 48
    # the cached features give the same figures; no new file
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = evaluate(b.model, b.tokenizer, b.preprocess_val, specs, feature_cache=str(cache))
    assert [r["metrics"] for r in again] == [lp, knn]
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.pt"))] == mtimes
    # other weights: other keys
    with torch.no_grad():
        b.model.visual.proj.mul_(-1)
    evaluate(b.model, b.tokenizer, b.preprocess_val, specs[1:2], feature_cache=str(cache))
    assert len(list(cache.glob("*.pt"))) == 4
    # no cache at all: the same figures as the first run (the features go through float16 either way)
    with torch.no_grad():
        b.model.visual.proj.mul_(-1)
    none = evaluate(b.model, b.tokenizer, b.preprocess_val, specs[1:2], feature_cache=False)
    assert none[0]["metrics"] == knn


def test_missing_train_split_is_one_line(demo_data, micro_model_json):
    from vlp.eval import EvalError, evaluate
    from vlp.models import create_model

    b = create_model(micro_model_json)
    with pytest.raises(EvalError, match="train split.*train_split"):
        evaluate(b.model, b.tokenizer, b.preprocess_val, [demo_data["eval_data"][0] + "?task=linear_probe"],
                 feature_cache=False)


def test_model_fingerprint_tracks_weights(micro_model_json):
    from vlp.models import create_model

    b = create_model(micro_model_json)
    a = FC.model_fingerprint(b.model)
    assert FC.model_fingerprint(b.model) == a
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert FC.model_fingerprint(b.model) != a


def test_benchmark_patches_clip_benchmark_accuracy_for_numpy_2():
    """benchmarks/eval.py runs CLIP_benchmark's probe with a NumPy-2-safe accuracy(): same figures as its own
    formula (computed here with .item()), where its own accuracy() raises under NumPy 2."""
    import numpy as np
    from clip_benchmark.metrics import linear_probe as lp

    from benchmarks.eval import numpy2_safe_accuracy

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    top = logits.topk(5, 1)[1]
    want = [(top[:, :k] == target[:, None]).any(1).float().mean().item() for k in (1, 5)]
    assert numpy2_safe_accuracy(logits, target.float(), (1, 5)) == pytest.approx(want)
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(TypeError):
            lp.accuracy(logits, target.float(), (1, 5))     # what the unpatched path would hit
