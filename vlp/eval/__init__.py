"""Zero-shot classification, retrieval and embedding geometry, at parity with CLIP_benchmark.

    from vlp.eval import evaluate
    results = evaluate(model, tokenizer, preprocess, ["/data/eval/demo_colors", "/data/coco.csv?name=coco"])

Each result is CLIP_benchmark's schema `{"dataset", "model", "pretrained", "task", "metrics", "language"}`
(+ `"vlp"`: step, sizes, seconds). Geometry figures are in `metrics` under `geometry/...`.
"""
from vlp.eval.api import evaluate
from vlp.eval.datasets import EvalError, EvalSet, open_eval_set

__all__ = ["evaluate", "EvalError", "EvalSet", "open_eval_set"]
