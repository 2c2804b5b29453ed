"""Where a run lives and what it logs: the run folder's paths and the metrics sink.

metrics.jsonl gets every logged scalar (one JSON object per logged step); accelerate's trackers
(TensorBoard) get the finite numeric ones. Only the main process writes.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vlp.config import Config, ConfigError


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def create(self) -> None:
        """Make the run folder and prove it writable now, not at the first checkpoint (one line if not)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write the run folder {self.root} (--logs/--name): "
                              f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None


def run_name(cfg: Config) -> str:
    if cfg.run.name:
        return cfg.run.name
    model = Path(cfg.model.model).stem if cfg.model.model.endswith(".json") else cfg.model.model
    return f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-model_{model}-lr_{cfg.optim.lr:g}-b_{cfg.data.batch_size}"


def flatten(prefix: str, d: dict) -> dict:
    """Nested dict -> {"a/b": scalar}; non-scalars become strings (for tracker hyper-parameters)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(key, v))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


class MetricsLog:
    """metrics.jsonl (every logged scalar) plus accelerate's trackers; main process only."""

    def __init__(self, path: Path, accelerator, enabled: bool):
        self.path, self.accelerator, self.enabled = path, accelerator, enabled

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in scalars.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.accelerator.log(numeric, step=step)
