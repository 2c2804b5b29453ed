"""Evaluation inside a training run: the `--eval-data` sets scored on the model being trained.

Every `--eval-data` set is opened and indexed once, before step 1 (`open_sets`): a missing folder or a
malformed set stops the run there with one line (ConfigError, exit 2), not after hours of training.

Each evaluation is split across ranks: every rank encodes its share of each set's images and texts in
the run's precision (`vlp.precision.eval_autocast`: an amp_bf16 run scores in bf16, an fp32 run in fp32;
the evaluator's own autocast is off, which chose fp16 on CUDA whatever the run's precision), the
features are gathered, and rank 0 computes the metrics once (`vlp.eval.evaluate` with
`distributed=True`). A sharded (`--fsdp`) model is split the same way: its weights are gathered on every
rank for the evaluation (`sharding.gathered`), so no forward is collective and a rank's share runs in its
own number of batches. While rank 0 alone computes a set's metrics (a probe's search can take long) the
other ranks wait for it apart from the collective timeout (`vlp.distributed.wait_for_main`). Results
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
from vlp.distributed import wait_for_main, world_info
from vlp.eval.api import Share
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
    def __init__(self, cfg, bundle, accelerator, metrics, sets=None, precision=None):
        self.sets = open_sets(cfg.run.eval_data) if sets is None else sets
        self.bundle, self.accelerator, self.metrics = bundle, accelerator, metrics
        self.batch_size = max(cfg.data.batch_size, 64)
        # the run's resolved precision (the trainer's): one policy for training and evaluation
        self.precision = precision or prec.resolve(cfg.run.precision, accelerator.device, fsdp=cfg.model.fsdp)

    def __call__(self, net, step: int) -> dict:
        if not self.sets:
            return {}
        from vlp.eval import evaluate

        acc, bundle = self.accelerator, self.bundle
        was_training = net.training
        net.eval()
        flat = {}
        try:
            with prec.eval_autocast(self.precision, acc.device), sharding.gathered(net) as split:
                share = WaitingShare(*world_info()) if acc.num_processes > 1 and split else False
                results = evaluate(net, bundle.tokenizer, bundle.preprocess_val, self.sets, device=acc.device,
                                   batch_size=self.batch_size, model_name=bundle.model_name, amp=False,
                                   pretrained=f"step {step}", distributed=share,
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
        wait_for_main()   # rank 0 computed the last set's metrics alone
        return flat


class WaitingShare(Share):
    """The evaluator's split across ranks, each encoding first waiting for rank 0's metrics of the set before
    (they are computed there alone, between the sets' collectives) with `wait_for_main`'s long timeout."""

    def encode(self, n, fn):
        wait_for_main()
        return super().encode(n, fn)
