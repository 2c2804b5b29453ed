"""Retrieval ties: `ties="clip_benchmark"` (the default) reproduces CLIP_benchmark's topk-order figures exactly,
on embeddings and end to end on an open_clip export that CLIP_benchmark itself scores; bit-identical
duplicates tie with the positive under `positive_wins` (in its favour); every result records its rule."""
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
    cb_rule = R.retrieval_metrics(img, txt, t2i, recall_k=ks)                  # the default rule
    ours = R.retrieval_metrics(img, txt, t2i, recall_k=ks, ties="positive_wins")
    for key, v in theirs.items():
        assert cb_rule[key] == v, key
    # positive_wins counts ties for the positive: never below CLIP_benchmark's, and above it here
    assert all(ours[k] >= theirs[k] for k in theirs)
    assert ours["image_retrieval_recall@1"] > theirs["image_retrieval_recall@1"]


def test_unknown_tie_rule_is_refused():
    img, txt, t2i = _with_duplicates(n_images=20, d=8)
    with pytest.raises(ValueError, match="ties"):
        R.retrieval_metrics(img, txt, t2i, ties="random")


def test_default_figures_equal_clip_benchmark_on_the_same_export(tmp_path, micro_model_json):
    """A retrieval set whose images share captions (image i and i + 30 have the same one, as the demo's 1,200
    captions hold 801 distinct ones) and a SugarCrepe subset, scored by `vlp eval` and by CLIP_benchmark's own code on one
    open_clip export: the default (`clip_benchmark`) gives CLIP_benchmark's figures; `positive_wins` does not."""
    import json

    import open_clip
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.datasets.sugar_crepe import SugarCrepe
    from clip_benchmark.metrics import image_caption_selection as ics

    import eval_zeroshot
    from data_tools.make_demo_data import write_compositional
    from vlp.data import demo_world as W
    from vlp.data.tario import ShardWriter
    from vlp.models import create_model, export_open_clip

    torch.manual_seed(0)
    b = create_model(micro_model_json)
    export = export_open_clip(b.model, b.model_cfg, open_clip.get_model_preprocess_cfg(b.model), tmp_path / "export")
    ret = tmp_path / "ret"
    (ret / "test").mkdir(parents=True)
    (ret / "dataset_type.txt").write_text("retrieval\n")
    import random

    rng = random.Random(0)
    shared: list[str] = []
    with ShardWriter(str(ret / "test" / "%d.tar"), 1000) as sink:
        for i in range(60):
            things = W.random_scene(rng)
            caps = W.phrasings(things, rng)[1:3]
            shared.append(caps[0])
            sink.write(f"s{i:04d}", {"png": W.encode_png(W.render(things, 32, rng)),
                                     "txt": f"{shared[i % 30]}\n{caps[1]}".encode()})
    (ret / "test" / "nshards.txt").write_text("1\n")
    write_compositional(tmp_path / "comp", 24, 32, seed=0)
    comp = tmp_path / "comp" / "swap_att.json"

    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tok = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    ds = build_dataset("wds/ret", root=str(ret), transform=pre, split="test", task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=0)
    theirs = zr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5])
    sc = SugarCrepe(root=str(tmp_path / "comp"), ann_file=str(comp), transform=pre)
    theirs_sel = ics.evaluate(model, torch.utils.data.DataLoader(sc, batch_size=64, collate_fn=image_captions_collate_fn),
                              tok, "cpu", amp=False)

    def ours(*flags):
        out = tmp_path / ("o" + "_".join(flags))
        assert eval_zeroshot.main(["--checkpoint", str(export), "--data", str(ret), str(comp), "--output", str(out),
                                   "--quiet", "--no-geometry", "--recall-k", "1", "5", *flags]) == 0
        return {json.loads(p.read_text())["task"]: json.loads(p.read_text()) for p in out.glob("*.json")}

    default, favour = ours(), ours("--ties", "positive_wins")
    for r in default.values():
        assert r["vlp"]["ties"] == "clip_benchmark"
    assert default["image_caption_selection"]["metrics"]["acc"] == theirs_sel["acc"]
    got = default["zeroshot_retrieval"]["metrics"]
    for key in ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                "text_retrieval_recall@5"):
        assert got[key] == pytest.approx(theirs[key], abs=1e-9), key
    # a caption shared by two images ties them: positive_wins counts the tie for the positive, topk's order may not
    assert favour["zeroshot_retrieval"]["vlp"]["ties"] == "positive_wins"
    fav = favour["zeroshot_retrieval"]["metrics"]
    assert all(fav[k] >= got[k] for k in got if "recall" in k) and any(fav[k] > got[k] for k in got if "recall" in k)


def test_compositional_default_is_clip_benchmarks_computation():
    """CLIP_benchmark's image_caption_selection run on given embeddings (a stub model returns them) equals
    vlp's default exactly, also where a third of the negatives are the caption itself: its [1, D] x [D, 2]
    product can score two identical captions a bit apart, which decides such a tie, and vlp's default makes the
    same product. `positive_wins` counts every such tie for the caption."""
    from clip_benchmark.metrics import image_caption_selection as ics

    from vlp.eval.compositional import selection_metrics

    g = torch.Generator().manual_seed(0)
    n, d = 300, 64
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    caps = F.normalize(img + 2.0 * torch.randn(n, d, generator=g) / d ** 0.5, dim=-1)
    negs = F.normalize(img + 2.0 * torch.randn(n, d, generator=g) / d ** 0.5, dim=-1)
    negs[::3] = caps[::3]                                             # the negative is the caption itself
    table = torch.stack([caps, negs], 1).reshape(2 * n, d)            # text i*2 + j

    class Stub(torch.nn.Module):
        def encode_image(self, x):
            return x.flatten(1)

        def encode_text(self, tok):
            return table[tok]

    loader = [(img[a:a + 64, :, None, None], [[2 * i, 2 * i + 1] for i in range(a, min(n, a + 64))])
              for a in range(0, n, 64)]
    theirs = ics.evaluate(Stub(), loader, lambda texts: torch.tensor(texts), "cpu", amp=False)["acc"]
    t2i = torch.arange(n).repeat_interleave(2)
    pos = torch.tensor([True, False]).repeat(n)
    emb_i, emb_t = F.normalize(img, dim=-1), F.normalize(table, dim=-1)
    assert selection_metrics(emb_i, emb_t, t2i, pos, ["s"] * n)["acc"] == theirs
    favour = selection_metrics(emb_i, emb_t, t2i, pos, ["s"] * n, ties="positive_wins")["acc"]
    assert favour > theirs                                            # the last bit did not always favour it
