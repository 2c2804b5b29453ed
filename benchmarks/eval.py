"""Evaluation benchmark: vlp vs CLIP_benchmark on zero-shot classification, and retrieval memory at scale.

    .venv/bin/python benchmarks/eval.py                       # defaults below, ~2-4 min on 2 CPU cores
    .venv/bin/python benchmarks/eval.py --classes 200 --images 200 --captions 20000   # quick look

1. Zero-shot classification, same model (random-weight `vlp-tiny` unless --checkpoint) and the same
   webdataset eval set (written here in CLIP_benchmark's layout: ImageNet class names, --templates OpenAI
   templates, demo-world images), same batch size, fp32 (CLIP_benchmark's CPU default autocasts to bf16), one
   process, 0 workers. Timed: classifier build + scoring of every image, for each side, after one warm-up
   forward, --repeat times each in alternating order, best wall time kept (the machine is shared).
   CLIP_benchmark's side is its own `zero_shot_classifier` + `run_classification` on its own wds
   loader (`build_dataset("wds/..")`); its `accuracy()` breaks under NumPy 2.x, so top-1 is computed from its
   logits with `.item()` (and its probe runs with `numpy2_safe_accuracy` in its place). Prints both times,
   the ratio (target >= 3x), and whether acc1 agrees.
   Where vlp's time goes down: prompts tokenised from their pieces (`vlp.eval.prompt_tokens`), each
   template's shared prefix encoded once, text batches trimmed at their last end-of-text token, and on CPU
   each --batch-size batch run in L2-sized calls (`vlp.eval.encode.cpu_chunk_rows`); CLIP_benchmark runs
   its own code unchanged, one class's prompts per call and each image batch in one call.
2. Retrieval at --captions captions (5 per image), random unit embeddings of --dim: peak resident memory
   added by vlp's chunked retrieval metrics (target < 2 GB), against the N x N float32 score matrix that
   CLIP_benchmark materialises (plus its boolean positive matrix), which is reported, not run.
3. Linear probe and k-NN on cached features: --lp-train x --dim train features (Gaussian classes, --lp-classes),
   --lp-test test features. vlp's probe (`vlp.eval.probe.linear_probe`: the L2 search on a held-out 20% of
   train, then the refit) and one L-BFGS fit alone are timed; k-NN (`vlp.eval.knn`, k = 1/10/20). CLIP_benchmark's
   linear probe calls .cuda() unconditionally: with CUDA it runs on the same features (its train = vlp's fit
   part, its val = vlp's held-out part) and both times and lp_acc1 are printed; on CPU vlp's time alone.
5. Whole process (what a user waits for, imports included): `--whole-process` runs benchmarks/eval_process.py,
   `vlp eval` against `clip_benchmark eval` as fresh processes with the same thread count, on 1,500 classes.
4. In-loop evaluation split across ranks: the demo's eval sets (colours 800, retrieval 400 x 3 captions,
   compositional) scored by `vlp.eval.evaluate(distributed=True)` in 2 gloo processes vs 1, one thread each,
   real processes; timed on the second call (decoded pixels cached, as in a training run's repeated evals).
   Target: world 2 < 0.65x world 1.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def make_wds_set(root: Path, n_images: int, n_classes: int, n_templates: int, image_size: int) -> None:
    import webdataset as wds
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from vlp.data import demo_world as W

    (root / "test").mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for i in range(n_classes):   # past ImageNet's 1,000: "tench 2", ...; its two "missile"s told apart likewise
        name = IMAGENET_CLASSNAMES[i % 1000] + (f" {i // 1000 + 1}" if i >= 1000 else "")
        names.append(name if name not in names else f"{name} {i}")
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    temps = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES[:n_templates]]
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(temps) + "\n")
    (root / "dataset_type.txt").write_text("zeroshot_classification\n")
    rng = random.Random(0)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=max(1, n_images // 2), verbose=0) as sink:
        for i in range(n_images):
            img = W.render(W.random_scene(rng), image_size, rng)
            sink.write({"__key__": f"s{i:07d}", "webp": _webp(img), "cls": str(i % n_classes)})
    (root / "test" / "nshards.txt").write_text(f"{len(list((root / 'test').glob('*.tar')))}\n")


def _webp(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="webp", lossless=True)
    return buf.getvalue()


def time_vlp(bundle, root: Path, batch_size: int) -> tuple[float, dict]:
    from vlp.eval import evaluate
    from vlp.eval.encode import clear_cache

    clear_cache()
    t0 = time.perf_counter()
    res = evaluate(bundle.model, bundle.tokenizer, bundle.preprocess_val, [str(root)], batch_size=batch_size,
                   amp=False, geometry=False, cache_images=False)
    return time.perf_counter() - t0, res[0]["metrics"]


def time_clip_benchmark(bundle, root: Path, batch_size: int) -> tuple[float, dict]:
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zc

    t0 = time.perf_counter()
    ds = build_dataset("wds/" + root.name, root=str(root), transform=bundle.preprocess_val, split="test",
                       task="zeroshot_classification")
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    clf = zc.zero_shot_classifier(bundle.model, bundle.tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    logits, target = zc.run_classification(bundle.model, clf, loader, "cpu", amp=False)
    seconds = time.perf_counter() - t0
    pred = logits.topk(min(5, logits.shape[1]), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    acc1 = correct[:1].reshape(-1).float().sum().item() / len(target)
    acc5 = correct[:5].reshape(-1).float().sum().item() / len(target)
    return seconds, {"acc1": acc1, "acc5": acc5}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def retrieval_memory(n_captions: int, per_image: int, dim: int) -> dict:
    from vlp.eval.retrieval import retrieval_metrics

    n_images = n_captions // per_image
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(per_image, 0) + 0.9 * torch.randn(n_captions, dim, generator=g), dim=-1)
    t2i = torch.arange(n_images).repeat_interleave(per_image)
    gc.collect()
    base = _rss_kb("VmRSS")
    try:  # reset the peak-RSS counter so VmHWM measures this step only (Linux)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    m = retrieval_metrics(img, txt, t2i)
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    cb_bytes = n_captions * n_images * (4 + 1)   # float32 scores + bool positives, before its top-k one-hots
    return {"captions": n_captions, "images": n_images, "dim": dim, "seconds": round(seconds, 2),
            "peak_rss_added_mb": round((peak - base) / 1024, 1) if reset else None,
            "peak_rss_mb": round(peak / 1024, 1), "embeddings_mb": round((img.numel() + txt.numel()) * 4 / 2**20, 1),
            "clip_benchmark_score_matrix_mb": round(cb_bytes / 2**20, 1),
            "R@1 t2i": round(m["image_retrieval_recall@1"], 4), "R@1 i2t": round(m["text_retrieval_recall@1"], 4)}


def _blobs(n: int, classes: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.nn.functional.normalize(mu[y] * 0.005 + torch.randn(n, dim, generator=g) / dim ** 0.5, dim=-1)
    return x.half().float(), y          # as read back from the float16 feature cache


def probe_rows(n_train: int, n_test: int, dim: int, classes: int) -> dict:
    """vlp's linear probe and k-NN on cached-like features; CLIP_benchmark's probe too when CUDA is there."""
    from vlp.eval.knn import knn_metrics
    from vlp.eval.probe import fit_logistic, linear_probe, stratified_split

    x, y = _blobs(n_train, classes, dim, 0)
    xt, yt = _blobs(n_test, classes, dim, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fit_logistic(x[:256], y[:256], classes, 1e-3, device=device)          # warm-up (first-call imports)
    t0, c0 = time.perf_counter(), time.process_time()
    one = fit_logistic(x, y, classes, 1e-4, device=device)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    m, info = linear_probe(x, y, xt, yt, classes, device=device)
    t_lp, c_lp = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    knn = knn_metrics(x, y, xt, yt, classes, device=device)
    t_knn, c_knn = time.perf_counter() - t0, time.process_time() - c0
    out = {"train": n_train, "test": n_test, "dim": dim, "classes": classes, "device": device,
           "vlp_one_fit_s": round(t_fit, 2), "vlp_one_fit_iterations": one.iterations,
           "vlp_probe_s": round(t_lp, 2), "lambdas_fitted": info["lambdas_fitted"], "lp_l2_lambda": m["lp_l2_lambda"],
           "lp_acc1": m["lp_acc1"], "knn_s": round(t_knn, 2), "threads": torch.get_num_threads(),
           "cpu_s": {"one_fit": round(c_fit, 2), "probe": round(c_lp, 2), "knn": round(c_knn, 2)}, **knn}
    if device == "cuda":
        fit, held = stratified_split(y, 0.2, 0)
        t0 = time.perf_counter()
        cb = _clip_benchmark_probe(x[fit], y[fit], x[held], y[held], xt, yt)
        out.update(clip_benchmark_probe_s=round(time.perf_counter() - t0, 2), clip_benchmark_lp_acc1=cb["lp_acc1"])
    return out


def numpy2_safe_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's `accuracy` (same figures) without its `float(ndarray)`, which NumPy 2 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _clip_benchmark_probe(x, y, xv, yv, xt, yt) -> dict:
    """CLIP_benchmark's linear_probe.evaluate on given features (its featurizer skipped: the cache is in place),
    with its accuracy() swapped for the NumPy-2-safe copy for the call."""
    from unittest import mock

    from clip_benchmark.metrics import linear_probe as lp

    with tempfile.TemporaryDirectory() as root, mock.patch.object(lp, "accuracy", numpy2_safe_accuracy):
        d = Path(root) / "bench"
        d.mkdir()
        for name, (f, t) in {"train": (x, y), "val": (xv, yv), "test": (xt, yt)}.items():
            torch.save(f, d / f"features_{name}.pt")
            torch.save(t, d / f"targets_{name}.pt")
        return lp.evaluate(torch.nn.Identity(), None, None, -1, 256, 0, 0.1, 10, "bench", 0, root, "cuda",
                           val_dataloader=[], normalize=True, amp=True)


def _scaling_worker(rank: int, world: int, port: int, sets: list, out: str, repeat: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from vlp.distributed import barrier
    from vlp.eval import evaluate
    from vlp.models import create_model

    torch.manual_seed(0)
    b = create_model("vlp-tiny")
    times, cpu = [], []
    for _ in range(repeat):
        barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate(b.model, b.tokenizer, b.preprocess_val, sets, distributed=world > 1, feature_cache=False)
        cpu.append(time.process_time() - c0)
        barrier()
        times.append(time.perf_counter() - t0)
    Path(f"{out}.{rank}").write_text(json.dumps({"times": times, "cpu": cpu, "metrics": [r["metrics"] for r in res]}))
    if world > 1:
        dist.destroy_process_group()


def inloop_scaling(eval_samples: int, repeat: int = 3) -> dict:
    """Seconds of one evaluation of the demo's eval sets at world size 1 and 2 (gloo, one thread per process)."""
    import socket

    import torch.multiprocessing as mp

    from data_tools.make_demo_data import make_demo_data

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_demo_data(Path(tmp) / "demo", train_samples=8, eval_samples=eval_samples, progress=False)
        sets = paths["eval_data"]
        for world in (1, 2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            res = Path(tmp) / f"w{world}.json"
            mp.start_processes(_scaling_worker, args=(world, port, sets, str(res), repeat), nprocs=world,
                               start_method="spawn")
            out[world] = [json.loads(Path(f"{res}.{r}").read_text()) for r in range(world)]
    w1, w2 = min(out[1][0]["times"][1:]), min(out[2][0]["times"][1:])
    # CPU seconds of the busiest rank: the wall time each rank would take on a core of its own
    c1 = min(out[1][0]["cpu"][1:])
    c2 = min(max(r["cpu"][i] for r in out[2]) for i in range(1, repeat))
    return {"sets": [Path(s).name for s in sets], "eval_samples": eval_samples, "world1_s": round(w1, 2),
            "world2_s": round(w2, 2), "ratio_wall": round(w2 / w1, 3), "world1_cpu_s": round(c1, 2),
            "world2_busiest_rank_cpu_s": round(c2, 2), "ratio_cpu": round(c2 / c1, 3),
            "rank_cpu_s": [round(r["cpu"][-1], 2) for r in out[2]],
            "same_metrics": _same_metrics(out[1][0]["metrics"], out[2][0]["metrics"])}


def _same_metrics(a: list, b: list) -> bool:
    """Equal figures (geometry to 1e-4: its sums run over differently batched features)."""
    import math

    for x, y in zip(a, b):
        for k, v in x.items():
            w = y.get(k)
            if isinstance(v, float) and math.isnan(v) and isinstance(w, float) and math.isnan(w):
                continue
            if k.startswith("geometry/") and abs(v - w) <= 1e-4 * max(1.0, abs(v)):
                continue
            if v != w:
                return False
    return len(a) == len(b)


def classification_row(a) -> dict:
    """In-process zero-shot scoring: CLIP_benchmark's code and vlp's on one model and set, alternating order."""
    from vlp.models import create_model, load_checkpoint

    bundle = load_checkpoint(a.checkpoint) if a.checkpoint else create_model(a.model)
    bundle.model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench_cls"
        make_wds_set(root, a.images, a.classes, a.templates, a.image_size)
        with torch.no_grad():  # warm-up: first-call allocations should not count against either side
            bundle.model.encode_text(bundle.tokenizer(["warm up"] * 8))
        walls = {"cb": [], "vlp": []}
        cpus = {"cb": [], "vlp": []}
        for rep in range(a.repeat):          # alternate the order; keep each side's best (least disturbed) run
            for side in (("cb", "vlp") if rep % 2 == 0 else ("vlp", "cb")):
                c0 = time.process_time()
                if side == "cb":
                    t, m_cb = time_clip_benchmark(bundle, root, a.batch_size)
                else:
                    t, m_vlp = time_vlp(bundle, root, a.batch_size)
                walls[side].append(t)
                cpus[side].append(time.process_time() - c0)
    t_cb, t_vlp = min(walls["cb"]), min(walls["vlp"])
    c = {
        "model": a.checkpoint or a.model, "classes": a.classes, "templates": a.templates, "images": a.images,
        "prompts": a.classes * a.templates, "repeats": a.repeat,
        "clip_benchmark_s": round(t_cb, 2), "vlp_s": round(t_vlp, 2), "speedup": round(t_cb / t_vlp, 2),
        "clip_benchmark_cpu_s": round(min(cpus["cb"]), 2), "vlp_cpu_s": round(min(cpus["vlp"]), 2),
        "all_wall_s": {k: [round(x, 2) for x in v] for k, v in walls.items()},
        "acc1_vlp": m_vlp["acc1"], "acc1_clip_benchmark": m_cb["acc1"],
        "acc5_vlp": m_vlp["acc5"], "acc5_clip_benchmark": m_cb["acc5"],
        "same_acc": m_vlp["acc1"] == m_cb["acc1"] and m_vlp["acc5"] == m_cb["acc5"]}
    print(f"zero-shot classification ({c['classes']} classes x {c['templates']} templates, {c['images']} images): "
          f"CLIP_benchmark {c['clip_benchmark_s']:.2f} s, vlp {c['vlp_s']:.2f} s, speed-up {c['speedup']:.2f}x "
          f"(target >= 3x; CPU s {c['clip_benchmark_cpu_s']} vs {c['vlp_cpu_s']}); acc1 {c['acc1_vlp']:.4f} vs {c['acc1_clip_benchmark']:.4f}, same: {c['same_acc']}")
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vlp-tiny")
    p.add_argument("--checkpoint", default=None, help="vlp checkpoint (default: random weights)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--templates", type=int, default=4)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2, help="timed runs per side (alternating order); best is kept")
    p.add_argument("--captions", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--skip-classification", action="store_true")
    p.add_argument("--lp-train", type=int, default=50_000)
    p.add_argument("--lp-test", type=int, default=10_000)
    p.add_argument("--lp-classes", type=int, default=10)
    p.add_argument("--skip-probe", action="store_true")
    p.add_argument("--inloop-samples", type=int, default=800, help="demo eval-set size for the in-loop scaling row")
    p.add_argument("--skip-inloop", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--whole-process", action="store_true", help="only the whole-process comparison "
                   "(benchmarks/eval_process.py; its own flags after --)")
    a, rest = p.parse_known_args(argv)
    if a.whole_process:
        from benchmarks.eval_process import main as whole_process

        return whole_process([r for r in rest if r != "--"])
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.manual_seed(0)
    out: dict = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}

    if not a.skip_classification:
        out["classification"] = classification_row(a)

    r = retrieval_memory(a.captions, 5, a.dim)
    out["retrieval"] = r
    print(f"retrieval ({r['captions']} captions x {r['images']} images, d={r['dim']}): peak memory added "
          f"{r['peak_rss_added_mb']} MB (target < 2048 MB; embeddings {r['embeddings_mb']} MB), {r['seconds']} s; "
          f"CLIP_benchmark's score+positive matrices alone: {r['clip_benchmark_score_matrix_mb']} MB")
    if not a.skip_probe:
        lp = out["probe"] = probe_rows(a.lp_train, a.lp_test, a.dim, a.lp_classes)
        cb = f"CLIP_benchmark {lp['clip_benchmark_probe_s']} s, lp_acc1 {lp['clip_benchmark_lp_acc1']:.4f}" \
            if "clip_benchmark_probe_s" in lp else "CLIP_benchmark's probe needs CUDA: vlp's time alone"
        print(f"linear probe ({lp['train']} x {lp['dim']} train, {lp['test']} test, {lp['classes']} classes, "
              f"{lp['device']}): vlp {lp['vlp_probe_s']} s with the L2 search ({lp['lambdas_fitted']} fits), "
              f"one L-BFGS fit {lp['vlp_one_fit_s']} s ({lp['vlp_one_fit_iterations']} iterations), "
              f"lp_acc1 {lp['lp_acc1']:.4f}; CPU s {lp['cpu_s']} on {lp['threads']} thread(s); {cb}")
        print(f"k-NN ({lp['train']} train x {lp['test']} test): {lp['knn_s']} s, "
              + ", ".join(f"{k} {lp[k]:.4f}" for k in ("knn_acc1@1", "knn_acc1@10", "knn_acc1@20")))
    if not a.skip_inloop:
        s = out["inloop"] = inloop_scaling(a.inloop_samples)
        print(f"in-loop eval split across ranks ({', '.join(s['sets'])}): busiest rank's CPU s world 1 "
              f"{s['world1_cpu_s']}, world 2 {s['world2_busiest_rank_cpu_s']} (ranks {s['rank_cpu_s']}), ratio "
              f"{s['ratio_cpu']} (target < 0.65); wall {s['world1_s']} s vs {s['world2_s']} s, ratio {s['ratio_wall']} "
              f"(meaningful only with a free core per rank); same metrics: {s['same_metrics']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
