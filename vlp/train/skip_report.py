"""The console's account of samples skipped (by reason) and samples changed (captions cut, extreme aspect ratios),
at each epoch end and in the summary: they were only in metrics.jsonl, so a shard whose GIF was skipped trained
with rc 0 and no word."""
from __future__ import annotations

from typing import Optional

from vlp.data import errors as E
from vlp.data.images import IMAGE_EXTS
from vlp.data.oddities import CAPTION_CUT, EXTREME_ASPECT, MAX_CAPTION_CHARS

WHY = {
    E.MISSING_IMAGE: f"no .{', .'.join(IMAGE_EXTS)} member: a .gif, .bmp or .tif one is not read, as in open_clip",
    E.NOT_IMAGE: "image bytes of no known format",
    E.CORRUPT_IMAGE: "image that fails to decode",
    E.IMAGE_TOO_LARGE: "more pixels than PIL's limit, refused undecoded",
    E.MISSING_CAPTION: "no .txt member nor a json caption",
    E.EMPTY_CAPTION: "empty caption",
    E.BAD_CAPTION_ENCODING: "caption not UTF-8",
}
CHANGED = {CAPTION_CUT: f"caption cut to {MAX_CAPTION_CHARS:,} characters",
           EXTREME_ASPECT: "aspect ratio over 10:1, trained on a 4:3 crop near its middle"}


def difference(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0) > 0}


def skip_line(prefix: str, skipped: dict[str, int], changed: dict[str, int]) -> Optional[str]:
    """'PREFIX: N skipped (reason n: why, ...); M changed (...)', or None when there is nothing to say."""
    parts = []
    if skipped:
        parts.append(f"{sum(skipped.values())} sample(s) skipped (" + ", ".join(
            f"{k} {v}" + (f": {WHY[k]}" if k in WHY else "") for k, v in sorted(skipped.items())) + ")")
    if changed:
        parts.append(f"{sum(changed.values())} trained on changed (" + ", ".join(
            f"{k} {v}: {CHANGED.get(k, k)}" for k, v in sorted(changed.items())) + ")")
    return f"{prefix}: " + "; ".join(parts) if parts else None
