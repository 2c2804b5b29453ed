"""Evaluation inside a training run: the `--eval-data` sets scored on the model being trained.

Every `--eval-data` set is opened and indexed once, before step 1 (`open_sets`): a missing folder or a
malformed set stops the run there with one line (ConfigError, exit 2), not after hours of training.

Each evaluation is split across ranks: every rank encodes its share of each set's images and texts in
the run's precision (`vlp.precision.eval_autocast`: an amp_bf16 run scores in bf16, an fp32 run in fp32;
the evaluator's own autocast is off, which chose fp16 on CUDA whatever the run's precision), the
features are gathered, and rank 0 computes the metrics once (`vlp.eval.evaluate` with
`distributed=True`). A sharded (`--fsdp`) model's forward is collective, so there every rank encodes
every set whole (the same number of batches on every rank), with the root's weights gathered. Results
are logged to the metrics sink as `eval/{dataset}/{metric}` and returned flat.

A set that fails during training (an image that no longer decodes, a file gone) does not stop training:
the failure is logged as `eval/{dataset}/error` in metrics.jsonl and as one line on stderr, the other
sets are still scored, and the run goes on. Ranks stay in step: a failure while encoding is agreed on
by all ranks before the features are gathered.
"""
from __future__ import annotations

import sys

from vlp import precision as prec
from vlp.config import ConfigError
from vlp.train import sharding


def open_sets(specs: list[str]) -> list:
    """Open and index every eval set now; ConfigError (one line) naming the set if one cannot be read."""
    from vlp.eval import EvalError, open_eval_set

    sets = []
    for spec in specs:
        try:
            es = open_eval_set(spec)
            es.samples()
        except EvalError as e:
            raise ConfigError(f"--eval-data {spec}: {e}") from None
        sets.append(es)
    names = [(es.name, es.task) for es in sets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"--eval-data: two sets are both named '{dup[0]}' ({dup[1]}): add ?name=... to one")
    return sets


class InLoopEval:
    def __init__(self, cfg, bundle, accelerator, metrics, sets=None):
        self.sets = open_sets(cfg.run.eval_data) if sets is None else sets
        self.bundle, self.accelerator, self.metrics = bundle, accelerator, metrics
        self.batch_size = max(cfg.data.batch_size, 64)
        self.precision = prec.resolve(cfg.run.precision, accelerator.device)

    def __call__(self, net, step: int) -> dict:
        if not self.sets:
            return {}
        from vlp.eval import evaluate

        acc, bundle = self.accelerator, self.bundle
        was_training = net.training
        net.eval()
        flat = {}
        try:
            sharded = sharding.is_sharded(net)
            with prec.eval_autocast(self.precision, acc.device), sharding.root_gathered(net):
                results = evaluate(net, bundle.tokenizer, bundle.preprocess_val, self.sets, device=acc.device,
                                   batch_size=self.batch_size, model_name=bundle.model_name, amp=False,
                                   pretrained=f"step {step}", distributed=acc.num_processes > 1 and not sharded,
                                   feature_cache=False, on_error="record")
        finally:
            net.train(was_training)
        for r in results:
            if "error" in r:
                flat[f"eval/{r['dataset']}/error"] = r["error"]
                print(f"eval at step {step}: {r['dataset']} ({r['task']}) failed: {r['error']}; training goes on",
                      file=sys.stderr, flush=True)
            else:
                flat.update({f"eval/{r['dataset']}/{k}": v for k, v in r["metrics"].items()
                             if isinstance(v, (int, float))})
                if r.get("vlp", {}).get("skipped_images"):      # undecodable images left out, counted
                    flat[f"eval/{r['dataset']}/skipped_images"] = r["vlp"]["skipped_images"]
        if acc.is_main_process:
            self.metrics.log(step, flat)
        acc.wait_for_everyone()
        return flat
