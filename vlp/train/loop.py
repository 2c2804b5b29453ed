"""The training loop, readable top to bottom: `train()` sets a run up, runs its epochs and finishes it.

accelerate places the model and optimiser (CPU, one GPU, or many processes launched by
`accelerate launch`/`torchrun`) and handles mixed precision; the data loader does its own
split by rank and worker (so its position can be checkpointed); the loss gathers features
across ranks itself. The loop drives small objects that each own one concern: the `Trainer` (model,
optimiser, one step and its end-of-step check, `health`), the metrics sink (`run_log`), the
checkpointer, the in-loop evaluator, stop signals (`preemption`). A run lives in `LOGS/NAME/` (see
docs/contracts.md).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from vlp.config import Config, ConfigError
from vlp.data.errors import DataError
from vlp.models import export_open_clip, model_identity
from vlp.runtime import checkpoint as ckpt
from vlp.runtime.peers import Peers
from vlp.runtime.preemption import Preempted, StopSignals
from vlp.train import device_batch, health, sharding
from vlp.train.checkpointer import Checkpointer
from vlp.train.collective_faults import PeerFault, timed_out
from vlp.train.console import Console
from vlp.train.cpu_default import DefaultModelOnCpu
from vlp.train.feed import StepFeed
from vlp.train.health import TrainingError
from vlp.train.inloop_eval import InLoopEval, open_sets
from vlp.train.launcher import LauncherWatch
from vlp.train.run_log import MetricsLog, RunPaths, flatten, run_name
from vlp.train.run_state import RunFolder
from vlp.train.skip_report import difference, skip_line
from vlp.train.setup import build_model, make_accelerator, resume_point, run_precision
from vlp.train.telemetry import Meter
from vlp.train.threads import configure_threads
from vlp.train.trainer import Trainer

__all__ = ["TrainingError", "Preempted", "train", "RunPaths", "run_name", "make_accelerator", "run_precision",
           "build_model", "Run"]


def train(cfg: Config, show_final_eval: bool = True) -> dict:
    """Run training as configured; returns the last logged scalars (and eval figures, if any).
    SIGTERM/SIGINT/SIGUSR1 end it after the current step with a checkpoint (raises Preempted).
    show_final_eval=False leaves the final figures to the caller (the demo prints them with chance levels)."""
    paths = RunPaths(Path(cfg.run.logs) / run_name(cfg))
    # under torchrun the agent's death stops the ranks as a signal does (LauncherWatch)
    with StopSignals() as signals, RunFolder(paths.root) as folder, LauncherWatch(signals) as launcher:
        try:
            run = Run(cfg, paths, signals, folder)
            while run.step < run.total_steps and (cfg.optim.max_steps or run.epoch < cfg.optim.epochs):
                run.train_epoch()
            return run.finish(show_final_eval)
        except Preempted:
            gone = launcher.stopped(paths.checkpoints)
            if gone is None:
                raise
            raise gone from None
        except RuntimeError as e:   # a collective that failed because a rank died or stalled: one line naming it
            lost = folder.peers.lost(e) if folder.peers is not None else None
            stalled = None if lost else timed_out(e, cfg.run.dist_timeout)
            if lost is None and stalled is None:
                raise
            found = ckpt.list_checkpoints(paths.checkpoints)
            last = f"the last checkpoint is {found[-1][1]} (step {found[-1][0]})" if found else "no checkpoint yet"
            raise PeerFault(f"{lost or stalled}; {last}: start the run again with --resume latest",
                            "rank lost" if lost else "collective timeout") from None


class Run:
    """One training run: its set-up, its epochs (`train_epoch`), its end (`finish`). Without --max-steps the run
    is --epochs epochs: an epoch cut short (a size file's phantom samples) is not made up by extra epochs."""

    def __init__(self, cfg: Config, paths: RunPaths, signals: StopSignals, folder: RunFolder):
        from accelerate.utils import set_seed

        if not cfg.data.train_data:
            raise ConfigError("--train-data is required")
        self.cfg, self.paths, self.signals = cfg, paths, signals
        eval_sets = open_sets(cfg.run.eval_data)          # a bad --eval-data set stops the run before step 1
        acc = self.accelerator = make_accelerator(cfg, paths)
        self.main, self.world = acc.is_main_process, acc.num_processes
        refused = folder.hold() if self.main else None   # one run per folder; every rank learns the answer
        if health.any_rank(refused is not None, acc.device):
            raise ConfigError(refused or f"run folder {paths.root} is in use by another training")
        folder.peers = Peers(acc)
        self.console = Console(self.main, cfg.run.progress)
        self.threads = configure_threads(cfg.run.threads, cfg.data.workers, acc.device,
                                         int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
        resume_from = resume_point(cfg, paths, self.console.print)
        paths.create()
        set_seed(cfg.run.seed, device_specific=True)
        self._build()
        self.step, self.epoch, self._loader_state = 0, 0, None
        if resume_from is not None:
            self.step, self.epoch, self._loader_state = self.trainer.checkpointer.restore(resume_from)
            self.console.print(f"resumed from {resume_from} at step {self.step}")
            self._aim_at_rest_of_run()
        folder.start(self.step)
        self._start_logs(eval_sets)

    def _build(self) -> None:
        """The model, the loader and the Trainer with the run's checkpointer."""
        from vlp.data.pipeline import build_train_loader

        cfg, acc = self.cfg, self.accelerator
        self.bundle = build_model(cfg)
        precision = run_precision(cfg)
        self.loader = build_train_loader(cfg.data, self.bundle.preprocess_train, self.bundle.tokenizer,
                                         rank=acc.process_index, world_size=self.world, seed=cfg.run.seed,
                                         device_normalize=device_batch.wanted(acc.device))
        to_device = device_batch.for_run(acc.device, self.loader, precision)
        self.steps_per_epoch = self.loader.batches_per_epoch // cfg.optim.accum_freq
        if self.steps_per_epoch < 1:
            raise ConfigError(f"an epoch holds {self.loader.batches_per_epoch} batches per process, fewer than "
                              f"--accum-freq {cfg.optim.accum_freq}: lower --batch-size or add data")
        self.total_steps = cfg.optim.max_steps or self.steps_per_epoch * cfg.optim.epochs
        self.trainer = Trainer(cfg, acc, self.bundle.model, total_steps=self.total_steps,
                               steps_per_epoch=self.steps_per_epoch, precision=precision)
        self.feed = StepFeed(self.loader, cfg.optim.accum_freq, to_device)
        self.trainer.checkpointer = Checkpointer(
            self.paths.checkpoints, acc, self.trainer.net, self.trainer.optimizer, self.trainer.scheduler,
            self.feed, cfg, {**model_identity(self.bundle, cfg.model.tokenizer), "precision": precision},
            say=self.console.print)

    def _aim_at_rest_of_run(self) -> None:
        """Without --max-steps a resumed run ends after its epochs on *these* ranks and workers: the restored step,
        the steps left in the (maybe re-planned) current epoch, then each remaining epoch at this run's
        steps_per_epoch. `--epochs x steps_per_epoch` is only that total when every epoch ran at today's world
        size (a run saved on fewer ranks would stop at once, one saved on more would stop mid-epoch). The lr
        schedule is aimed at the new total from the restored step on (docs/reliability.md, Elastic runs)."""
        cfg, state = self.cfg, self._loader_state
        if cfg.optim.max_steps or not isinstance(state, dict) or "epoch_batches" not in state:
            return   # (a loader state of before re-planning: saved on this world size, the old total holds)
        accum = cfg.optim.accum_freq
        in_epoch = max(int(state["epoch_batches"]) // accum - int(state["batches_done"]) // accum, 0)
        total = self.step + in_epoch + max(cfg.optim.epochs - self.epoch - 1, 0) * self.steps_per_epoch
        if total != self.total_steps and total > 0:
            self.total_steps = total
            self.trainer.aim_schedule(total, self.steps_per_epoch)

    def _start_logs(self, eval_sets: list) -> None:
        """config.yaml, trackers, metrics.jsonl, the evaluator, the meter and the banner."""
        cfg, acc, net = self.cfg, self.accelerator, self.trainer.net
        if self.main:
            (self.paths.root / "config.yaml").write_text(
                yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
        if cfg.run.report_to not in (None, "none"):
            acc.init_trackers("tensorboard", config=flatten("", cfg.to_dict()))  # -> RUN/tensorboard/
        self.metrics = MetricsLog(self.paths.metrics, acc, self.main)
        self.trainer.evaluator = InLoopEval(cfg, self.bundle, acc, self.metrics, eval_sets,
                                            precision=self.trainer.precision)
        self.samples_per_step = cfg.data.batch_size * cfg.optim.accum_freq * self.world
        self.meter = Meter.for_model(net, self.samples_per_step, self.world, acc.device)
        self.console.begin(cfg, net=net, model_name=self.bundle.model_name, loader=self.loader, device=acc.device,
                           world=self.world, precision=self.trainer.precision, threads=self.threads,
                           steps=(self.step, self.steps_per_epoch, self.total_steps), run_dir=self.paths.root)
        self.cpu_note = DefaultModelOnCpu(self.bundle.model_name, acc.device, sum(p.numel() for p in net.parameters()))
        if note := self.cpu_note.at_start():
            self.console.print(note)
        self.start_step, self.last, self.empty_epochs = self.step, {}, 0
        self._clock = (time.perf_counter(), self.step)

    def train_epoch(self) -> None:
        """The steps of one epoch; then the checks that its data was all there."""
        cfg, feed, trainer, meter = self.cfg, self.feed, self.trainer, self.meter
        self.loader.set_epoch(self.epoch)
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)
            self._loader_state = None
        feed.start()
        step_at_epoch_start = self.step
        seen_before = self.loader.skip_counts(), self.loader.noted_counts()
        with meter.waiting():
            more = health.all_ranks(feed.fetch(), self.accelerator.device)

        def fetch_next() -> bool:   # the next step's batches, while the device still works on this one
            with meter.waiting():
                return self.step + 1 < self.total_steps and feed.fetch()

        while more:
            meter.begin()   # the step's clock: its compute, the next step's fetch, the optimiser
            feed.advance()
            losses, verdict = trainer.step(feed.current, fetch_next, self.signals.requested, number=self.step + 1)
            if verdict.problem:
                where = "" if verdict.at else f" at step {self.step + 1}"
                raise TrainingError(f"{verdict.problem}{where}; {trainer.save_before_failure(self.step, self.epoch)}")
            self.step += 1
            more = verdict.more
            meter.step()
            self.console.step(self.step)
            trainer.checkpointer.poll()   # a background save that failed: one line
            if self.step == self.start_step + 1 and (note := self.cpu_note.after_first_step(
                    time.perf_counter() - self._clock[0], self.total_steps - self.start_step)):
                self.console.print(note)
            self._after_step(losses, stop=verdict.stop)
        if line := skip_line(f"epoch {self.epoch}", difference(self.loader.skip_counts(), seen_before[0]),
                             difference(self.loader.noted_counts(), seen_before[1])):
            self.console.print(line)
        self._end_epoch(step_at_epoch_start)

    def _after_step(self, losses: dict, stop: bool) -> None:
        """Log, evaluate, save as scheduled; stop (saved) when a signal asked for it."""
        cfg, step, trainer = self.cfg, self.step, self.trainer
        if step % cfg.run.log_every == 0 or step == self.total_steps:
            self.last = self._figures(losses)
            self.metrics.log(step, self.last)
            self.console.log(step, self.last)
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < self.total_steps:
            self.last.update(results := trainer.evaluate(step))
            self.console.eval(step, results)
        if step % cfg.run.save_every == 0 and step < self.total_steps:
            trainer.save(step, self.epoch, background=True)
        if stop:
            raise Preempted(f"{self.signals.name}: stopped after step {step}, state saved in "
                            f"{trainer.save(step, self.epoch)}; continue with --resume latest")

    def _figures(self, losses: dict) -> dict:
        now = time.perf_counter()
        t_last, step_last = self._clock
        rate = self.samples_per_step * (self.step - step_last) / max(now - t_last, 1e-9)
        self._clock = (now, self.step)
        return {**self.trainer.figures(losses), "train/samples_per_s": rate, "train/epoch": self.epoch,
                **{f"data/skipped/{k}": v for k, v in self.loader.skip_counts().items()},
                "data/retries": self.loader.retries(), **self.meter.report()}

    def _end_epoch(self, step_at_epoch_start: int) -> None:
        feed, step = self.feed, self.step
        if health.any_rank(feed.error is not None, self.accelerator.device):   # the last good state first
            raise DataError(f"{feed.error or 'a data error on another rank'}; the state after step {step} is saved "
                            f"in {self.trainer.save(step, self.epoch)}")
        # A resumed run may start at the very end of an epoch; two empty epochs in a row mean no data.
        self.empty_epochs = self.empty_epochs + 1 if step == step_at_epoch_start else 0
        if self.empty_epochs >= 2:
            raise TrainingError(f"epoch {self.epoch} yielded no complete batch: check --train-data and the skip "
                                f"counts")
        if step < self.total_steps:
            trained = feed.state_dict()["batches_done"] // self.cfg.optim.accum_freq
            owed = self.loader.batches_per_epoch // self.cfg.optim.accum_freq   # (a re-planned epoch's rest: fewer)
            if trained < owed:   # a rank's data ran out early (the loader warned which shard lied)
                self.console.print(f"warning: epoch {self.epoch} ended after {trained} of {owed} "
                                   f"steps: shards delivered fewer samples than their size files claim (see the "
                                   f"skip counts); the run still ends after --epochs")
            self.epoch += 1

    def finish(self, show_final_eval: bool) -> dict:
        """The last checkpoint, the open_clip export, the final evaluation and the summary."""
        from vlp.distributed import wait_for_main

        cfg, trainer, step, net = self.cfg, self.trainer, self.step, self.trainer.net
        self.console.close()
        final = trainer.save(step, self.epoch)
        if health.any_rank(self.signals.requested, self.accelerator.device):
            raise Preempted(f"{self.signals.name}: stopped after the last step, state saved in {final}; "
                            f"--resume latest exports and evaluates it")
        gathered = sharding.full_state(net)[0] if sharding.is_sharded(net) else None  # every rank takes part
        if self.main:
            import open_clip

            export_open_clip(net, self.bundle.model_cfg, open_clip.get_model_preprocess_cfg(net), self.paths.export,
                             tokenizer=cfg.model.tokenizer, state_dict=gathered)
        wait_for_main()  # the export is rank 0's alone: the others wait apart from the collective timeout
        self.last.update(results := trainer.evaluate(step))
        self.console.eval(step, results, show=show_final_eval)
        self.accelerator.end_training()
        self.console.summary(step=step, samples_seen=(step - self.start_step) * self.samples_per_step,
                             last=self.last, checkpoint=final, export=self.paths.export, run_dir=self.paths.root)
        if line := skip_line("  in all", self.loader.skip_counts(), self.loader.noted_counts()):
            self.console.print(line)
        self.last["run_dir"] = str(self.paths.root)
        return self.last
