"""Pre-flight check of the shard list, before step 1: what will not be read, and whether the plan can work.

open_clip starts and then hangs or starves when there are fewer shards than ranks x workers (its issues
#569, #61) and counts nothing for a missing shard; vlp says both up front, in one line each, and refuses to
start when the shards that cannot be read hold more than `--max-bad-fraction` of the expected samples.
"""
from __future__ import annotations

from vlp.config import DataConfig
from vlp.data.errors import DataError
from vlp.data.shards import ShardSet
from vlp.data.streams import is_remote


def preflight(shards: ShardSet, cfg: DataConfig, world_size: int) -> list[str]:
    """'warning: ' lines to print (on rank 0) before training; DataError when the unreadable shards exceed the
    threshold."""
    lines = []
    n = len(shards.urls)
    bad = list(dict.fromkeys(shards.missing + shards.unreadable))
    if bad:
        index = {u: i for i, u in enumerate(shards.urls)}
        lost = sum(shards.sizes[index[u]] for u in bad)
        total = max(shards.total, 1)
        guessed = sum(1 for u in bad if u in shards.estimated)
        what = f"{lost} of {total} expected samples ({lost / total:.1%})"
        if guessed:
            what += f"; {guessed} without a recorded size count as the mean shard size"
        msg = (f"{len(bad)} of {n} shards cannot be read ({len(shards.missing)} missing, {len(shards.unreadable)} "
               f"not a tar; e.g. {bad[0]}): {what}")
        if lost > cfg.max_bad_fraction * total:
            raise DataError(f"{msg}, more than --max-bad-fraction {cfg.max_bad_fraction}; "
                            f"check the shards with `vlp data inspect`")
        lines.append(f"warning: pre-flight: {msg}, counted as skipped every epoch")
    workers = max(1, cfg.workers)
    readers = world_size * workers
    if n < readers:
        how = ("each draws shards with replacement" if cfg.dataset_resampled
               else "each reads its own range of samples, so shards are shared and every reader has data")
        line = f"warning: pre-flight: {n} shards for {world_size} ranks x {workers} workers = {readers} readers: {how}"
        if any(is_remote(u) for u in shards.urls) and not cfg.dataset_resampled:
            line += "; a stream is read from its start to each range, so more shards than readers read faster"
        lines.append(line)
    return lines
