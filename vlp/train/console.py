"""What a training run says on the console (stderr, main process only).

A start-up banner (model, size, FLOPs, devices, data, schedule, where the run folder is), warnings
worth reading before the run starts (each printed once), a progress bar on a terminal or one plain
line every `--log-every` steps otherwise (`--no-progress`, or stderr redirected to a file as under
SLURM), in-loop evaluation results as a small table, and a final summary. The loop calls it in a
few lines; it never decides anything about the run.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import IO, Optional

from vlp.progress import isatty

# Figures the bar and the log lines show, in this order, with a short label; loss terms come first.
RATE_KEYS = ("perf/samples_per_s", "train/samples_per_s")
PERF_SHOWN = (("perf/data_wait_frac", "data_wait", "{:.0%}"), ("perf/step_ms", "step_ms", "{:.0f}"),
              ("perf/mfu", "mfu", "{:.1%}"), ("perf/max_mem_gb", "mem_gb", "{:.1f}"))
HEADLINE = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
            "text_retrieval_recall@1", "text_retrieval_recall@5", "acc")   # acc: compositional hard negatives
GEOMETRY = ("geometry/modality_gap", "geometry/mean_paired_cosine")
SHORT = {"mean_per_class_recall": "mpcr", "image_retrieval_recall@1": "t2i@1", "image_retrieval_recall@5": "t2i@5",
         "text_retrieval_recall@1": "i2t@1", "text_retrieval_recall@5": "i2t@5",
         "geometry/modality_gap": "gap", "geometry/mean_paired_cosine": "pair_cos"}


def human(n: float) -> str:
    """1234567 -> '1.23M' (parameter and sample counts in the banner)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eval_table(flat: dict) -> str:
    """`{"eval/<dataset>/<metric>": value}` -> a small table: one row per dataset, headline metrics first,
    then the modality gap and paired cosine."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if not key.startswith("eval/"):
            continue
        for metric in HEADLINE + GEOMETRY:
            if key.endswith("/" + metric):
                rows.setdefault(key[len("eval/"):-len(metric) - 1], {})[metric] = value
    if not rows:
        return ""
    cols = [m for m in HEADLINE + GEOMETRY if any(m in r for r in rows.values())]
    header = ["dataset"] + [SHORT.get(c, c) for c in cols]
    body = [[ds] + [_num(r.get(c)) for c in cols] for ds, r in sorted(rows.items())]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header)] + [fmt(b) for b in body])


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}"


def log_fields(scalars: dict) -> list[str]:
    """The figures of one log line / bar postfix: loss and its terms, lr, logit scale, rate, perf/*."""
    out = []
    terms = [k for k in scalars if k.startswith("train/") and k not in
             ("train/loss", "train/lr", "train/logit_scale", "train/samples_per_s", "train/epoch", "train/logit_bias")]
    if "train/loss" in scalars:
        out.append(f"loss {scalars['train/loss']:.4f}")
    if len(terms) > 1:  # the base loss alone equals the total: shown once
        out += [f"{k[len('train/'):]} {scalars[k]:.4f}" for k in terms if isinstance(scalars[k], (int, float))]
    if "train/lr" in scalars:
        out.append(f"lr {scalars['train/lr']:.2e}")
    if "train/logit_scale" in scalars:
        out.append(f"scale {scalars['train/logit_scale']:.1f}")
    if "train/logit_bias" in scalars:
        out.append(f"bias {scalars['train/logit_bias']:.2f}")
    rate = next((scalars[k] for k in RATE_KEYS if k in scalars), None)
    if rate is not None:
        out.append(f"{rate:.0f} samples/s")
    for key, label, fmt in PERF_SHOWN:
        if isinstance(scalars.get(key), (int, float)) and math.isfinite(scalars[key]):
            out.append(f"{label} {fmt.format(scalars[key])}")
    return out


def flops_per_sample(net) -> Optional[float]:
    """Forward FLOPs per (image, text) pair from telemetry's one counter (None if it cannot count this model)."""
    from vlp.train.telemetry import flops_per_sample as count

    try:
        return float(count(net))
    except Exception:  # noqa: BLE001 - a banner figure must never stop a run
        return None


class Console:
    """The run's voice on stderr. Disabled (silent) on every process but the main one."""

    def __init__(self, enabled: bool, progress: bool = True, stream: Optional[IO] = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.use_bar = enabled and progress and isatty(self.stream)
        self.warnings: list[str] = []
        self.bar = None
        self.t0 = self.t_created = time.perf_counter()
        self.start_step = 0
        self.total_steps = 0
        self.best: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: Optional[int] = None
        self.last_eval_shown = True

    # ---- plain output ------------------------------------------------------------------------
    def print(self, text: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def warn(self, message: Optional[str]) -> None:
        """Print `warning: message` once per distinct message (None is ignored)."""
        if not message or message in self.warnings:
            return
        self.warnings.append(message)
        self.print(f"warning: {message}")

    # ---- start ----------------------------------------------------------------------------------
    def banner(self, fields: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in fields) if fields else 0
        self.print("vlp train")
        for key, value in fields:
            self.print(f"  {key.ljust(width)}  {value}")

    def begin(self, cfg, *, net, model_name: str, loader, device, world: int, precision: str,
              threads: tuple[int, str], steps: tuple[int, int, int], run_dir: Path) -> None:
        """Banner, start-up warnings, then the progress display; `steps` = (current, per epoch, total)."""
        step, per_epoch, total = steps
        if self.enabled:
            accum = cfg.optim.accum_freq
            self.banner(banner_fields(
                model_name=model_name, net=net, flops=flops_per_sample(net), device=device, world=world,
                precision=precision, threads=threads, samples_per_epoch=loader.samples_per_epoch,
                steps_per_epoch=per_epoch, total_steps=total, global_batch=cfg.data.batch_size * accum * world,
                accum=accum, run_dir=run_dir, shards=loader.shards, workers=cfg.data.workers, resume_step=step))
            for warning in run_warnings(cfg, shards=loader.shards, total_steps=total, device=device):
                self.warn(warning)
        self.start(step, total)

    def start(self, step: int, total_steps: int) -> None:
        """Begin the progress display at `step` (a resumed run starts past 0)."""
        self.t0, self.start_step, self.total_steps = time.perf_counter(), step, total_steps
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc="train",
                            file=self.stream)

    # ---- during the run ---------------------------------------------------------------------------
    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, scalars: dict) -> None:
        """A logged step's scalars: the bar's postfix on a terminal, else one plain line."""
        if not self.enabled:
            return
        fields = log_fields(scalars)
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(fields), refresh=False)
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        pct = 100 * step / max(self.total_steps, 1)
        eta_s = duration(eta) if math.isfinite(eta) else "?"
        self.print(f"step {step}/{self.total_steps} ({pct:.0f}%) | " + " | ".join(fields) +
                   f" | elapsed {duration(elapsed)} | eta {eta_s}")

    def eval(self, step: int, flat: dict, show: bool = True) -> None:
        """In-loop evaluation results as a table (unless the caller prints them itself, as the demo does);
        remembers the last and best headline figures."""
        if not flat:
            return
        self.last_eval, self.last_eval_step, self.last_eval_shown = dict(flat), step, show
        for key, value in flat.items():
            if any(key.endswith("/" + m) for m in HEADLINE) and isinstance(value, (int, float)) \
                    and not math.isnan(value):
                self.best[key] = max(self.best.get(key, -math.inf), value)
        table = eval_table(flat)
        if table and show:
            self.print(f"eval at step {step}:")
            for line in table.splitlines():
                self.print("  " + line)

    # ---- end --------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, *, step: int, samples_seen: int, last: dict, checkpoint: Optional[Path],
                export: Optional[Path], run_dir: Path) -> None:
        self.close()
        wall, train_s = time.perf_counter() - self.t_created, time.perf_counter() - self.t0
        lines = [f"done: {step} steps, {human(samples_seen)} samples seen in {duration(wall)} wall time "
                 f"({samples_seen / max(train_s, 1e-9):.0f} samples/s since the first step, eval included)"]
        fields = [f for f in log_fields(last) if not f.endswith("samples/s")]
        if fields:
            lines.append("  last: " + " | ".join(fields))
        if self.last_eval and self.last_eval_step == step:   # its table was printed just above, or the caller
            where = "above" if self.last_eval_shown else "below"   # prints it after this summary
            lines.append(f"  last eval: step {step}, {where}")
        elif self.last_eval:
            lines.append(f"  last eval (step {self.last_eval_step}):")
            lines += ["    " + ln for ln in eval_table(self.last_eval).splitlines()]
        improved = {k: v for k, v in self.best.items() if v > self.last_eval.get(k, -math.inf)}
        if improved:
            lines.append("  best eval (earlier step): " +
                         ", ".join(f"{k[len('eval/'):]} {v:.3f}" for k, v in sorted(improved.items())))
        if checkpoint is not None:
            lines.append(f"  checkpoint: {checkpoint}")
        if export is not None:
            lines.append(f"  export:     {export}  (open_clip: local-dir:{export})")
        lines.append(f"  run folder: {run_dir}")
        if self.warnings:
            lines.append(f"  {len(self.warnings)} warning(s) above")
        for line in lines:
            self.print(line)


# ---- what the banner and the start-up warnings say (pure functions of the run's objects) -------------

def source_lines(shards) -> list[str]:
    """One line per '::' source of a ShardSet: shards, samples, and how many are missing."""
    out = []
    n_sources = max(shards.source) + 1 if shards.source else 0
    for s in range(n_sources):
        idx = [i for i, src in enumerate(shards.source) if src == s]
        missing = sum(1 for i in idx if shards.urls[i] in set(shards.missing))
        first = shards.urls[idx[0]] if idx else "?"
        weight = shards.weights[s] if s < len(shards.weights) else 1.0
        line = f"{len(idx)} shards, {human(sum(shards.sizes[i] for i in idx))} samples ({first} ...)"
        if weight != 1.0:
            line += f", weight {weight:g}"
        if missing:
            line += f", {missing} MISSING"
        out.append(line)
    return out


def _device_kind(device) -> str:
    """'cuda:1' -> 'cuda' (the banner of a multi-process run names the kind, not rank 0's index)."""
    return str(device).split(":", 1)[0]


def banner_fields(*, model_name: str, net, flops: Optional[float], device, world: int, precision: str,
                  threads: tuple[int, str], samples_per_epoch: int, steps_per_epoch: int, total_steps: int,
                  global_batch: int, accum: int, run_dir: Path, shards, workers: int, resume_step: int = 0) -> list:
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    size = f"{human(params)} parameters" + (f" ({human(trainable)} trainable)" if trainable != params else "")
    fields = [
        ("model", f"{model_name}: {size}, " + (f"{flops / 1e9:.4g} GFLOP per sample forward (training ~3x)"
                                               if flops else "FLOPs per sample n/a")),
        ("devices", f"{world} x {_device_kind(device) if world > 1 else device}"   # each rank has its own index
                    + (f", {threads[0]} torch threads ({threads[1]})" if str(device).startswith("cpu") else "")),
        ("precision", precision),
        ("batch", f"global {global_batch} = {global_batch // max(world * accum, 1)} x {world} process(es)"
                  + (f" x {accum} accumulation" if accum > 1 else "")),
        ("schedule", f"{total_steps} steps, {steps_per_epoch} per epoch of {human(samples_per_epoch)} samples"
                     f" ({total_steps / max(steps_per_epoch, 1):.3g} epochs)"
                     + (f"; resuming at step {resume_step}" if resume_step else "")),
        ("loader", f"{workers} workers per process"),
    ]
    for i, line in enumerate(source_lines(shards)):
        fields.append(("data" if i == 0 else "", line))
    fields.append(("run folder", str(run_dir)))
    return fields


def shards_lack_rewrites(shards, field: str, peek: int = 8) -> bool:
    """True when the first samples of every source's first present shard carry no rewrites under `field`."""
    from vlp.data.captions import read_rewrites
    from vlp.data.tario import TarError, read_shard

    missing = set(shards.missing)
    firsts = {}
    for url, src in zip(shards.urls, shards.source):
        if url not in missing:
            firsts.setdefault(src, url)
    for url in firsts.values():
        try:
            for s in read_shard(url, stop=peek, exts=["json"]):
                if read_rewrites(s.files, field):
                    return False
        except TarError:
            continue
    return bool(firsts)


def run_warnings(cfg, *, shards, total_steps: int, device) -> list[str]:
    """What deserves a line before the run starts; each is printed once by Console.warn."""
    from vlp.precision import cpu_warning

    out = []   # missing and unreadable shards: the loader's pre-flight lines (vlp.data.preflight)
    if cfg.data.use_rewrites and shards_lack_rewrites(shards, cfg.data.rewrites_field):
        out.append(f"--use-rewrites, but the first samples of the shards have no '{cfg.data.rewrites_field}' in "
                   "their .json: training on the original captions (data_tools.add_rewrites adds them)")
    if cfg.optim.warmup >= total_steps:
        out.append(f"--warmup {cfg.optim.warmup} is not shorter than the run ({total_steps} steps): "
                   "the learning rate never reaches --lr")
    out.append(cpu_warning(cfg.run.precision, device))
    return [w for w in out if w]
