"""What every eval module shares: the task names, `EvalError`, and the `Sample` / `EvalSet` records.

A leaf module (it imports nothing of vlp.eval), so the set openers (`datasets`, `compositional`), the
readers and the decoder can all use it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
LINEAR_PROBE = "linear_probe"
KNN = "knn"
CAPTION_SELECTION = "image_caption_selection"     # CLIP_benchmark's name for SugarCrepe-style sets
PROBE_TASKS = (LINEAR_PROBE, KNN)                 # classification layouts scored from a train split's features
LABELLED = (CLASSIFICATION,) + PROBE_TASKS
TASKS = (CLASSIFICATION, RETRIEVAL, LINEAR_PROBE, KNN, CAPTION_SELECTION)
SPEC_KEYS = {"name", "task", "split", "classnames", "templates", "root", "train_split", "train", "fewshot_k"}
CAPTION_FILE_EXTS = {".csv", ".tsv", ".jsonl", ".json"}

Template = Union[str, Callable[[str], str]]


class EvalError(ValueError):
    """Bad evaluation input (missing class names, empty set, undecodable image...); the message is one line."""


@dataclass
class Sample:
    """One image to score: where its bytes come from, and its class index or its captions."""

    key: str
    target: Union[int, list[str]]
    data: Optional[bytes] = None     # raw bytes ...
    path: Optional[str] = None       # ... or a file (image folder, caption file) ...
    span: Optional[tuple[int, int]] = None   # ... or (offset, size) of the image inside tar `path` (wds)
    where: str = ""                  # shard or file, for error messages


@dataclass
class EvalSet:
    """One set to score: its task, metadata, and `reader`, which indexes its samples on first use."""

    spec: str
    name: str
    task: str
    kind: str                        # "wds", "folder", "captions"
    root: Path
    classnames: Optional[list[str]] = None
    templates: Optional[Union[list[Template], dict[str, list[str]]]] = None
    options: dict[str, str] = field(default_factory=dict)
    reader: Optional[Callable[["EvalSet"], list[Sample]]] = field(default=None, repr=False)
    _samples: Optional[list[Sample]] = field(default=None, repr=False)

    def samples(self) -> list[Sample]:
        """All samples, indexed once: labels and captions in memory, images read when decoded."""
        if self._samples is None:
            items = list(self.reader(self)) if self.reader is not None else []
            if not items:
                raise EvalError(f"{self.name}: the eval set is empty ({self.root})")
            if self.task in LABELLED:
                n_cls = len(self.classnames or [])
                bad = next((s for s in items if not 0 <= int(s.target) < n_cls), None)
                if bad is not None:
                    raise EvalError(f"{self.name}: sample {bad.key} has class {bad.target} but there are "
                                    f"{n_cls} class names")
            self._samples = items
        return self._samples

    def fingerprint(self) -> tuple:
        """Identifies the set's content on disk (for caching decoded images)."""
        return (self.spec,) + self.data_fingerprint()

    def data_fingerprint(self) -> tuple:
        """The files (names, times, sizes) and split this set reads, whatever task or name its spec gives."""
        files = [self.root] if self.root.is_file() else sorted(self.root.rglob("*"))[:10000]
        return (self.kind, str(self.root), self.options.get("split"), self.options.get("classnames"),
                tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.is_file()))

