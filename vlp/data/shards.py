"""Shard specs as open_clip users write them, and how many samples each shard holds.

    /data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar
    pipe:aws s3 cp s3://bucket/cc12m/{00000..01242}.tar -      https://host/cc3m/{00000..00331}.tar

* brace expansion (`braceexpand`), sources joined by `::`;
* per-source weights (`--train-data-upsampling-factors 1::0.5`, open_clip's meaning: an upsampling
  factor per source). In resampled mode a shard is drawn with probability proportional to
  `weight * shard size`; in epoch mode a source contributes each of its shards `floor(weight)` times
  plus a seeded random `frac(weight)` share of its shards, chosen afresh every epoch;
* sample counts per shard, first found of: `sizes.json` next to the shard (open_clip's
  `{shard file name: n}`, also what `data_tools.make_shards` writes), img2dataset's
  `{shard stem}_stats.json` (`successes`) or `{shard stem}.parquet`, else counted by reading the tar headers;
  size files are read from the shard's own location (a URL's folder, a pipe command's argument);
* shards may be local paths, globs, folders, `pipe:CMD`, `http(s)://` or fsspec URLs (`vlp.data.streams`).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from braceexpand import braceexpand

from vlp.data.errors import DataError
from vlp.data.streams import is_remote, local_path, read_small, shard_name, sibling
from vlp.data.tario import TarError, _Bytes, count_samples, iter_members


def resolve(spec: str) -> list[list[str]]:
    """The shard locations of a spec, per `::` source, in order: brace lists expanded, a local glob or folder (its
    `*.tar`, e.g. img2dataset's output folder) listed, URLs and `pipe:` commands kept as written.

    'a/{0..1}.tar::b/' -> [['a/0.tar', 'a/1.tar'], ['b/00000.tar', ...]]. A local path that does not exist is kept
    (the loader counts it as a missing shard); a glob or folder that matches nothing is a DataError."""
    if not spec or not spec.strip():
        raise DataError("--train-data is empty")
    sources = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise DataError(f"empty source in shard spec {spec!r}")
        urls: list[str] = []
        for u in braceexpand(part):
            path = None if is_remote(u) else local_path(u)
            if path is not None and os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not found:
                    raise DataError(f"no .tar files in {u}")
                urls += found
            elif path is not None and any(c in path for c in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise DataError(f"no shard matches {u}")
                urls += found
            else:
                urls.append(u)
        sources.append(urls)
    return sources


def parse_weights(weights: Optional[str], n_sources: int) -> list[float]:
    if weights is None or weights == "":
        return [1.0] * n_sources
    parts = [w for w in str(weights).split("::")]
    if len(parts) != n_sources:
        raise DataError(f"--train-data-upsampling-factors has {len(parts)} values for {n_sources} sources")
    try:
        out = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"--train-data-upsampling-factors must be numbers joined by '::' (got {weights!r})") from None
    if any(w < 0 for w in out) or not any(w > 0 for w in out):
        raise DataError("--train-data-upsampling-factors must be >= 0 with at least one > 0")
    return out


@lru_cache(maxsize=1024)
def _small_file(url: str, mtime: Optional[float], timeout: Optional[float], retries: int) -> Optional[bytes]:
    try:
        return read_small(url, timeout, retries)
    except OSError as e:
        hint = ""
        if url.startswith(("s3://", "s3a://")) and not (os.environ.get("AWS_ENDPOINT_URL")
                                                       or os.environ.get("FSSPEC_S3_ENDPOINT_URL")):
            hint = "; for an S3-compatible store (MinIO, Ceph, moto) set AWS_ENDPOINT_URL=http://host:port"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read the size file {_short(url)}: {why}{hint}") from None


def _read_cached(url: str, timeout: Optional[float] = None, retries: int = 0) -> Optional[bytes]:
    """A size file's bytes, cached (a local one until it changes on disk); DataError when its location answers
    with a transport error (refused, stalled, HTTP 503) after `retries` more tries."""
    path = local_path(url)
    if path is not None:
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            return None
        return _small_file(url, mtime, None, 0)
    return _small_file(url, None, timeout, retries)


def _json(url: Optional[str], timeout: Optional[float] = None, retries: int = 0):
    raw = _read_cached(url, timeout, retries) if url else None
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _count(value, where: str) -> int:
    ok = (isinstance(value, int) and not isinstance(value, bool)) or \
        (isinstance(value, float) and value.is_integer()) or (isinstance(value, str) and value.strip().isdigit())
    if not ok or int(value) < 0:
        raise DataError(f"{where} is {value!r}, not a sample count")
    return int(value)


def _parquet_successes(url: Optional[str], timeout: Optional[float] = None, retries: int = 0) -> Optional[int]:
    """Rows with status 'success' in img2dataset's per-shard parquet (needs pyarrow); None if unavailable."""
    raw = _read_cached(url, timeout, retries) if url else None
    if raw is None:
        return None
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw), columns=["status"])
        return sum(1 for s in table.column("status").to_pylist() if s == "success")
    except Exception:  # noqa: BLE001 - no pyarrow, no status column, not a parquet file
        return None


def shard_size(url: str, timeout: Optional[float] = None, retries: int = 0) -> Optional[int]:
    """Sample count of one shard from the size files beside it (read from the same location, local or remote),
    or None if none records it: `sizes.json` ({file name: n}, open_clip's and make_shards' format), else
    img2dataset's `{stem}_stats.json` (`successes`), else img2dataset's `{stem}.parquet` (rows with status success)."""
    name = shard_name(url)
    sizes = _json(sibling(url, "sizes.json"), timeout, retries)
    if isinstance(sizes, dict) and name in sizes:
        return _count(sizes[name], f"sizes.json's entry for {name}")
    stem = name[:-4] if name.endswith(".tar") else name
    stats = _json(sibling(url, f"{stem}_stats.json"), timeout, retries)
    if isinstance(stats, dict) and "successes" in stats:
        return _count(stats["successes"], f"{stem}_stats.json's successes")
    return _parquet_successes(sibling(url, f"{stem}.parquet"), timeout, retries)


@dataclass
class ShardSet:
    urls: list[str]
    sizes: list[int]                 # recorded or counted; estimated for a bad shard without a recorded size
    source: list[int]                # source index of each url
    weights: list[float]             # per source
    missing: list[str] = field(default_factory=list)     # shards found absent before reading (local files)
    unreadable: list[str] = field(default_factory=list)  # shards whose first header is no tar header
    estimated: list[str] = field(default_factory=list)   # shards whose size is an estimate (the mean of the others)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """Shard indices of one epoch (weights applied), shuffled reproducibly from (seed, epoch)."""
        rng = random.Random(f"vlp-shards-{seed}-{epoch}")
        order: list[int] = []
        for s, w in enumerate(self.weights):
            ids = [i for i, src in enumerate(self.source) if src == s]
            whole, frac = int(w), w - int(w)
            order += ids * whole
            k = round(frac * len(ids))
            if k:
                order += rng.sample(ids, k)
        rng.shuffle(order)
        return order

    def draw_weights(self) -> list[float]:
        """Per-shard probabilities (unnormalised) for resampled mode."""
        return [self.weights[s] * max(n, 1) for s, n in zip(self.source, self.sizes)]


def shard_list_hash(shards: ShardSet) -> str:
    """'N shards, sha256 prefix' of what the epoch plan depends on: each shard's source, file name and size, and the
    source weights (not the folder or URL, so that a resume may read the same shards from a new place)."""
    rows = [[s, shard_name(u), n] for s, u, n in zip(shards.source, shards.urls, shards.sizes)]
    digest = hashlib.sha256(json.dumps([rows, shards.weights]).encode()).hexdigest()[:16]
    return f"{len(rows)} shards, {digest}"


def _first_header_ok(path: str) -> bool:
    """Whether a local shard starts like a tar (one header read: catches a random-bytes or HTML `.tar`)."""
    try:
        src = _Bytes(path)
    except OSError:
        return False
    try:
        next(iter_members(src, path), None)
        return True
    except TarError as e:
        return e.kind != "bad_header"
    finally:
        src.close()


def load_shards(spec: str, upsampling: Optional[str] = None, count_unknown: bool = True,
                retries: int = 0, timeout: Optional[float] = None) -> ShardSet:
    """Resolve `spec` and learn each shard's size; local shards are checked for existence and a tar header.

    A shard that is missing or unreadable keeps its place: its recorded size, else the mean size of the
    readable shards, is what the loader counts as lost when it fails to read it (so a missing shard weighs
    what it would have held, not one sample)."""
    sources = resolve(spec)
    weights = parse_weights(upsampling, len(sources))
    urls, sizes, src, missing, unreadable, unknown = [], [], [], [], [], []
    streamed = False
    for s, us in enumerate(sources):
        for u in us:
            n = shard_size(u, timeout, retries)
            path = local_path(u)
            if path is not None and not os.path.isfile(path):
                missing.append(u)
            elif path is not None and not _first_header_ok(path):
                unreadable.append(u)
            elif n is None:
                if not count_unknown:
                    raise DataError(f"no sample count for {u}: add sizes.json or give --train-num-samples")
                if path is None and not streamed:
                    streamed = True
                    print(f"counting the samples of remote shards without a size file by reading them through "
                          f"(e.g. {_short(u)}); a sizes.json beside them saves this", file=sys.stderr, flush=True)
                try:
                    n = count_samples(u, retries=retries, timeout=timeout)
                except TarError as e:
                    if e.kind == "missing":
                        missing.append(u)
                        n = None
                    elif e.kind == "bad_header" and e.next_index == 0:
                        unreadable.append(u)
                        n = None
                    else:
                        n = max(e.next_index, 0)
            urls.append(u)
            sizes.append(n)
            src.append(s)
            if n is None:
                unknown.append(len(urls) - 1)
    bad = set(missing) | set(unreadable)
    if len(bad) == len(urls):
        raise DataError(f"no shard of --train-data exists or is readable (first: {_short(urls[0])})")
    known = [n for u, n in zip(urls, sizes) if n is not None and u not in bad]
    mean = max(1, round(sum(known) / len(known))) if known else 1
    estimated = [urls[i] for i in unknown]
    sizes = [mean if n is None else int(n) for n in sizes]
    if sum(n for u, n in zip(urls, sizes) if u not in bad) == 0:
        raise DataError(f"the shards of --train-data hold no samples (first: {_short(urls[0])})")
    return ShardSet(urls, sizes, src, weights, missing, unreadable, estimated)


def _short(url: str) -> str:
    return url if len(url) < 120 else url[:117] + "..."


def shard_urls(spec: str) -> list[str]:
    """All shard locations of a spec, sources concatenated (what the data tools iterate)."""
    return [u for src in resolve(spec) for u in src]
