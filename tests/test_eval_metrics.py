"""vlp's zero-shot / retrieval metrics equal CLIP_benchmark's on the same inputs; geometry matches its definitions."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlp.eval import geometry as G
from vlp.eval import retrieval as R
from vlp.eval import zeroshot as Z

zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


def _cb_accuracy(logits, target, topk):
    """CLIP_benchmark's `accuracy`; under NumPy 2.x its float()-on-array fails, so the same figure with .item()."""
    try:
        return zc.accuracy(logits, target, topk=topk)
    except TypeError:
        pred = logits.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy().item() / len(target) for k in topk]


@pytest.mark.parametrize("n_classes", [3, 10, 37])
def test_classification_metrics_equal_clip_benchmark(n_classes):
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(n_classes)
    n = 500
    # imbalanced targets, one class absent, logits correlated with the target so accuracy is non-trivial
    target = torch.randint(0, n_classes, (n,), generator=g) % max(1, n_classes - 1)
    logits = torch.randn(n, n_classes, generator=g)
    logits[torch.arange(n), target] += torch.rand(n, generator=g) * 2
    ours = Z.classification_metrics(logits, target, n_classes)
    if n_classes >= 5:
        acc1, acc5 = _cb_accuracy(logits, target, (1, 5))
        assert ours["acc5"] == acc5
    else:
        (acc1,) = _cb_accuracy(logits, target, (1,))
        assert math.isnan(ours["acc5"])
    assert ours["acc1"] == acc1
    with warnings.catch_warnings():  # sklearn warns about the class that is predicted but absent
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(target, logits.argmax(axis=1))
    assert ours["mean_per_class_recall"] == expected
    assert 0 < ours["acc1"] < 1


def _cb_retrieval(images, texts, text_to_image, ks, batch_size=64):
    """CLIP_benchmark's `zeroshot_retrieval.evaluate` from the embeddings on (same code after encoding)."""
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores, positive_pairs, batch_size, "cpu",
                                                          k=k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu",
                                                         k=k) > 0).float().mean().item()
    return out


def _random_retrieval(n_images=150, d=32, seed=0, noise=1.2):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_images, d, generator=g), dim=-1)
    per = torch.randint(1, 6, (n_images,), generator=g)
    per[7] = 0                                            # an image without captions (never retrieved)
    t2i = torch.repeat_interleave(torch.arange(n_images), per)
    txt = F.normalize(img[t2i] + noise * torch.randn(len(t2i), d, generator=g), dim=-1)
    return img, txt, t2i


def test_retrieval_recall_equals_clip_benchmark():
    img, txt, t2i = _random_retrieval()
    ks = (1, 5, 10)
    ours = R.retrieval_metrics(img, txt, t2i, recall_k=ks, text_chunk=37, image_chunk=29)
    theirs = _cb_retrieval(img, txt, t2i, ks)
    for key, v in theirs.items():
        assert ours[key] == v, key
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1


def test_retrieval_ranks_match_brute_force_and_do_not_depend_on_chunks():
    img, txt, t2i = _random_retrieval(n_images=60, seed=3)
    s = txt @ img.T
    # text -> image: 1 + images scoring above the own image
    own = s[torch.arange(len(t2i)), t2i]
    exp_t = (s > own[:, None]).sum(1) + 1
    # image -> text: 1 + non-captions scoring above the best caption
    exp_i = []
    for i in range(img.shape[0]):
        mine = t2i == i
        if not mine.any():
            exp_i.append(len(t2i) + 1)
            continue
        best = s[mine, i].max()
        exp_i.append(int((s[~mine, i] > best).sum()) + 1)
    for tc, ic in [(1, 1), (7, 5), (10_000, 10_000)]:
        rt, ri = R.retrieval_ranks(img, txt, t2i, text_chunk=tc, image_chunk=ic)
        assert torch.equal(rt, exp_t)
        assert ri.tolist() == exp_i
    m = R.retrieval_metrics(img, txt, t2i)
    assert m["image_retrieval_mean_rank"] == pytest.approx(exp_t.double().mean().item())
    assert m["text_retrieval_median_rank"] == float(np.median(exp_i))


def test_perfect_retrieval():
    img = F.normalize(torch.randn(20, 16), dim=-1)
    t2i = torch.arange(20).repeat_interleave(2)
    m = R.retrieval_metrics(img, img[t2i], t2i)
    assert m["image_retrieval_recall@1"] == 1.0 and m["text_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_mean_rank"] == 1.0 and m["text_retrieval_median_rank"] == 1.0


def test_geometry_matches_definitions():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(300, 24, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(300, 24, generator=g) + 0.3, dim=-1)
    m = G.geometry_metrics(img, txt)
    assert m["geometry/modality_gap"] == pytest.approx((img.mean(0) - txt.mean(0)).norm().item(), rel=1e-5)
    assert m["geometry/mean_paired_cosine"] == pytest.approx((img * txt).sum(1).mean().item(), rel=1e-5)
    assert m["geometry/alignment"] == pytest.approx((img - txt).norm(dim=1).pow(2).mean().item(), rel=1e-5)
    unif = torch.pdist(img.double()).pow(2).mul(-2).exp().mean().log().item()
    assert m["geometry/uniformity_image"] == pytest.approx(unif, rel=1e-9)
    s = torch.linalg.svdvals(txt.double())
    p = s / s.sum() + 1e-7
    assert m["geometry/rankme_text"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-9)
    # the Gram route (N > 4D) gives the same RankMe
    big = F.normalize(torch.randn(500, 8, generator=g), dim=-1)
    s = torch.linalg.svdvals(big.double())
    p = s / s.sum() + 1e-7
    assert G.rankme(big) == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-6)
    # identical modalities: no gap, perfect alignment
    same = G.geometry_metrics(img, img)
    assert same["geometry/modality_gap"] < 1e-6 and same["geometry/alignment"] < 1e-10
    assert same["geometry/mean_paired_cosine"] == pytest.approx(1.0)


def test_classifier_equals_clip_benchmark(micro_model_json):
    from vlp.models import create_model

    b = create_model(micro_model_json)
    b.model.eval()
    classes = ["red", "green", "blue", "a very long class name with many words in it", "cat"]
    templates = ["a photo of a {c}.", "{c}", "a blurry photo of the {c}, taken at night."]
    ours = Z.build_classifier(b.model, b.tokenizer, classes, templates, batch_size=4)
    theirs = zc.zero_shot_classifier(b.model, b.tokenizer, classes, templates, "cpu", amp=False).T
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=2e-6)
    # class-specific prompts (CuPL-style dict) go through the same path
    cupl = {c: [f"a {c}", f"the {c} here"] for c in classes}
    ours = Z.build_classifier(b.model, b.tokenizer, classes, cupl, batch_size=3)
    theirs = zc.zero_shot_classifier(b.model, b.tokenizer, classes, cupl, "cpu", amp=False).T
    assert torch.allclose(ours, theirs, atol=2e-6)


def test_per_class_report():
    logits = torch.tensor([[3., 0, 0], [0, 3, 0], [3, 0, 0], [0, 0, 3]])
    target = torch.tensor([0, 1, 1, 2])
    rep = Z.per_class_report(logits, target, ["a", "b", "c"])
    assert rep["accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert rep["top_confusions"][0] == {"true": "b", "predicted": "a", "count": 1, "fraction_of_true": 0.5}
