"""Helpers shared by the data tests (tiny shards in tmp dirs, an id-revealing tokenizer)."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
from PIL import Image

from vlp.config import DataConfig
from vlp.data.tario import ShardWriter


def jpeg(i: int, size=(40, 30)) -> bytes:
    im = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class IdTokenizer:
    """'cap 17 ...' -> [17, 0, len]; 'rw2 17 ...' -> [17, 2, len]: lets tests see which sample/text came out."""

    def __call__(self, texts):
        rows = []
        for t in texts:
            m = re.search(r"(?:rw(\d+) )?(\d+)", t)
            rows.append([int(m.group(2)), int(m.group(1) or 0), len(t.split()), int("AUG" in t)])
        return torch.tensor(rows, dtype=torch.long)


def preprocess(size=16):
    from open_clip.transform import image_transform

    return image_transform(size, is_train=True)


def write_shards(root: Path, n: int, per_shard: int, *, rewrites: int = 0, bad: dict | None = None,
                 sizes: bool = True, start: int = 0) -> list[str]:
    """Samples with ids start..start+n-1; `bad` maps id -> dict of member overrides (None drops the member)."""
    root.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(str(root / "%05d.tar"), per_shard)
    for i in range(start, start + n):
        files = {"jpg": jpeg(i), "txt": f"cap {i} words".encode()}
        meta = {"caption": f"cap {i} words"}
        if rewrites:
            meta["rewrites"] = [f"rw{j} {i} text" for j in range(1, rewrites + 1)]
        files["json"] = json.dumps(meta).encode()
        for k, v in ((bad or {}).get(i) or {}).items():
            if v is None:
                files.pop(k, None)
            else:
                files[k] = v
        w.write(f"{i:06d}", files)
    w.close()
    if sizes:
        (root / "sizes.json").write_text(json.dumps(w.sizes))
    return w.paths


def spec(paths: list[str]) -> str:
    return "::".join([]) or str(Path(paths[0]).parent / ("{%s..%s}.tar" % (Path(paths[0]).stem, Path(paths[-1]).stem)))


def cfg(train_data: str, **kw) -> DataConfig:
    d = dict(train_data=train_data, batch_size=8, workers=2, shuffle_buffer=16, max_bad_fraction=1.0)
    d.update(kw)
    return DataConfig(**d)


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, t) for x, t in loader]


def resumed(c: DataConfig, k: int, *, seed: int = 0, epoch: int = 0):
    """A fresh loader restored from the state another one had after `k` batches of `epoch` (the state passed
    through JSON, as a checkpoint stores it): it yields the rest of that epoch."""
    import json as _json

    from vlp.data.pipeline import build_train_loader

    L = build_train_loader(c, preprocess(), IdTokenizer(), seed=seed)
    L.set_epoch(epoch)
    it = iter(L)
    for _ in range(k):
        next(it)
    state = _json.loads(_json.dumps(L.state_dict()))
    it.close()
    R = build_train_loader(c, preprocess(), IdTokenizer(), seed=seed)
    R.load_state_dict(state)
    R.set_epoch(epoch)
    return R


def sigkill_while_staging(cmd: list[str], out: Path, prefix: str, shards: int = 1, **popen) -> Path:
    """Start a data tool, SIGKILL it once its staging folder (`prefix`... under `out`) holds `shards` shards,
    and return the one staging folder it left: a tool killed for real, mid-write, as a cluster kills it."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 60
    while len(list(out.glob(f"{prefix}*/0000*.tar"))) < shards:
        assert proc.poll() is None and time.monotonic() < deadline, f"did not start writing: {' '.join(cmd)}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    dead = list(out.glob(f"{prefix}*"))
    assert len(dead) == 1, dead
    return dead[0]
