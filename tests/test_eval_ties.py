"""Retrieval ties: bit-identical duplicates tie with the positive under vlp's rule (in its favour), and
`ties="clip_benchmark"` reproduces CLIP_benchmark's topk-order figures exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp.eval import retrieval as R

zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


def _with_duplicates(n_images=400, per=5, d=512, dup_share=0.05, seed=0):
    """Random image embeddings of which `dup_share` are bit-identical copies of another image; 5 noisy
    captions per image (the issue's setting, scaled down)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_images, d, generator=g), dim=-1)
    n_dup = int(n_images * dup_share)
    src = torch.randperm(n_images, generator=g)[:2 * n_dup]
    img[src[n_dup:]] = img[src[:n_dup]]
    t2i = torch.arange(n_images).repeat_interleave(per)
    txt = F.normalize(img[t2i] + 1.5 * torch.randn(len(t2i), d, generator=g) / d ** 0.5 * 4, dim=-1)
    return img, txt, t2i


def _reference_ranks(img, txt, t2i, tol=R.TIE_TOL):
    """Float64 scores, every score from one matrix product, ties (within tol) to the positive."""
    s = txt.double() @ img.double().T
    pos = s[torch.arange(len(t2i)), t2i]
    rank_t = (s > pos[:, None] + tol).sum(1) + 1
    best = torch.full((img.shape[0],), float("-inf"), dtype=torch.float64).scatter_reduce(
        0, t2i, pos, reduce="amax")
    rank_i = (s > best[None, :] + tol).sum(0) + 1
    return rank_t, rank_i


def test_duplicates_tie_with_the_positive():
    img, txt, t2i = _with_duplicates()
    exp_t, exp_i = _reference_ranks(img, txt, t2i)
    for tc, ic in [(1024, 4096), (97, 53)]:
        rt, ri = R.retrieval_ranks(img, txt, t2i, text_chunk=tc, image_chunk=ic)
        assert torch.equal(rt, exp_t)
        assert torch.equal(ri, exp_i)
    # the setting is one where ties decide figures: a duplicate's caption has two images with its exact score
    dup_texts = (exp_t == 1) & (((txt @ img.T) == (txt @ img.T).max(1, keepdim=True).values).sum(1) > 1)
    assert dup_texts.sum() > 20


def _cb(img, txt, t2i, ks, batch_size=64):
    scores = txt @ img.T
    pos = torch.zeros_like(scores, dtype=bool)
    pos[torch.arange(len(scores)), t2i] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores, pos, batch_size, "cpu", k=k)
                                              > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores.T, pos.T, batch_size, "cpu", k=k)
                                             > 0).float().mean().item()
    return out


def test_clip_benchmark_tie_rule_reproduces_its_figures():
    img, txt, t2i = _with_duplicates(seed=1)
    ks = (1, 5, 10)
    theirs = _cb(img, txt, t2i, ks)
    cb_rule = R.retrieval_metrics(img, txt, t2i, recall_k=ks, ties="clip_benchmark")
    ours = R.retrieval_metrics(img, txt, t2i, recall_k=ks)
    for key, v in theirs.items():
        assert cb_rule[key] == v, key
    # vlp's rule counts ties for the positive: never below CLIP_benchmark's, and above it here
    assert all(ours[k] >= theirs[k] for k in theirs)
    assert ours["image_retrieval_recall@1"] > theirs["image_retrieval_recall@1"]


def test_unknown_tie_rule_is_refused():
    img, txt, t2i = _with_duplicates(n_images=20, d=8)
    with pytest.raises(ValueError, match="ties"):
        R.retrieval_metrics(img, txt, t2i, ties="random")
