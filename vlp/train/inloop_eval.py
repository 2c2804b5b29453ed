"""Evaluation inside a training run: the `--eval-data` sets scored on the model being trained.

Runs on the main process in the run's autocast; every rank waits for it. Results are logged
to the metrics sink as `eval/{dataset}/{metric}` and returned flat.
"""
from __future__ import annotations


class InLoopEval:
    def __init__(self, cfg, bundle, accelerator, metrics):
        self.sets, self.bundle, self.accelerator, self.metrics = cfg.run.eval_data, bundle, accelerator, metrics
        self.batch_size = max(cfg.data.batch_size, 64)

    def __call__(self, net, step: int) -> dict:
        if not self.sets:
            return {}
        from vlp.eval import evaluate

        acc, bundle = self.accelerator, self.bundle
        was_training = net.training
        net.eval()
        flat = {}
        if acc.is_main_process:
            with acc.autocast():
                results = evaluate(net, bundle.tokenizer, bundle.preprocess_val, self.sets,
                                   device=acc.device, batch_size=self.batch_size,
                                   model_name=bundle.model_name, pretrained=f"step {step}")
            for r in results:
                flat.update({f"eval/{r['dataset']}/{k}": v for k, v in r["metrics"].items()
                             if isinstance(v, (int, float))})
            self.metrics.log(step, flat)
        net.train(was_training)
        acc.wait_for_everyone()
        return flat
