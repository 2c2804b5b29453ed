"""Check webdataset shards: counts, caption and image statistics, duplicates, unreadable members.

    vlp data inspect 'shards/{00000..00099}.tar'
    vlp data inspect shards/ --json report.json

Exit status 0 when every shard reads cleanly, 1 when something is broken (missing or truncated shard,
corrupt header, unreadable image, missing/empty/non-UTF-8 caption, duplicate key, count differing from
sizes.json / _stats.json), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from vlp.data import errors as E
from vlp.data.errors import DataError, SkipSample
from vlp.data.images import IMAGE_EXTS, open_image
from vlp.data.shards import shard_size, shard_urls
from vlp.data.tario import TarError, read_shard
from vlp.flags import Parser


def _check_image(data: bytes, decode: bool) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    try:
        im = open_image(data)
    except SkipSample as s:
        return s.reason, None
    size = im.size
    if decode:
        try:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        except Exception:  # noqa: BLE001
            return "corrupt_image", size
    return None, size


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {"min": min(xs), "mean": round(statistics.fmean(xs), 2), "median": statistics.median(xs), "max": max(xs)}


def inspect(spec: str, decode: bool = True, rewrites_field: str = "rewrites", max_report: int = 20,
            show: int = 0) -> dict:
    """The report; `show` > 0 adds the first `show` samples under "shown" (key, caption, rewrites, and the
    image bytes under "image", which --json leaves out)."""
    urls = shard_urls(spec)
    captions: Counter = Counter()
    shown: list[dict] = []
    seen_keys: dict[str, str] = {}
    cap_words, widths, heights, n_rewrites = [], [], [], []
    total = Counter()
    shards = []
    examples: list[str] = []
    for url in urls:
        rep = {"shard": url, "samples": 0, "problems": Counter()}
        try:
            for s in read_shard(url, exts=list(IMAGE_EXTS) + ["txt", "json"]):
                key, files = s.key, s.files
                rep["samples"] += 1
                prob = []
                if key in seen_keys:
                    prob.append("duplicate_key")
                seen_keys.setdefault(key, url)
                img = s.image
                if img is None:
                    prob.append("missing_image")
                else:
                    err, size = _check_image(img, decode)
                    if err:
                        prob.append(err)
                    if size:
                        widths.append(size[0])
                        heights.append(size[1])
                cap = None
                try:
                    cap = s.caption()
                    cap_words.append(len(cap.split()))
                    captions[cap] += 1
                except SkipSample as skip:
                    prob.append(skip.reason)
                if "json" in files:
                    if not _is_json_object(files["json"]):
                        prob.append("bad_json")
                    n_rewrites.append(len(s.rewrites(rewrites_field)))
                if len(shown) < show:
                    shown.append({"key": key, "caption": cap, "rewrites": s.rewrites(rewrites_field), "image": img})
                for pr in prob:
                    rep["problems"][pr] += 1
                    if len(examples) < max_report:
                        examples.append(f"{url}: {key}: {pr}")
        except TarError as e:
            kind = E.TAR_REASONS.get(e.kind, E.BAD_TAR)
            rep["problems"][kind] += 1
            examples.append(f"{url}: {kind} after {e.next_index} samples")
        expected = shard_size(url)
        rep["expected"] = expected
        if expected is not None and expected != rep["samples"] and "missing_shard" not in rep["problems"]:
            rep["problems"]["count_mismatch"] += 1
            examples.append(f"{url}: size file says {expected}, shard holds {rep['samples']}")
        total.update(rep["problems"])
        rep["problems"] = dict(rep["problems"])
        shards.append(rep)
    return {
        "shards": len(urls),
        "samples": sum(s["samples"] for s in shards),
        "problems": dict(sorted(total.items())),
        "caption_words": _stats(cap_words),
        "image_width": _stats(widths),
        "image_height": _stats(heights),
        "samples_with_rewrites": sum(1 for n in n_rewrites if n),
        # captions seen before (a repeated caption is not an error, but many mean less to learn from)
        "duplicate_captions": sum(captions.values()) - len(captions),
        "most_repeated_captions": [[c, n] for c, n in captions.most_common(5) if n > 1],
        "shown": shown,
        "per_shard": shards,
        "examples": examples,
        "ok": not total,
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("shards", help="shard spec (brace expansion, '::' sources) or a folder of .tar files")
    p.add_argument("--no-decode", action="store_true", help="only read image headers (faster; misses corrupt data)")
    p.add_argument("--rewrites-field", default="rewrites", help="json field holding rewrites")
    p.add_argument("--json", help="also write the full report to this file")
    p.add_argument("--quiet", action="store_true", help="no per-shard lines")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N samples (key, caption, rewrites)")
    p.add_argument("--contact-sheet", metavar="FILE.png", help="write a grid of the first samples' thumbnails with their "
                                                                "captions (the first max(24, --show N) samples)")
    a = p.parse_args(argv)
    show = max(a.show, 24 if a.contact_sheet else 0)
    for flag, target in (("--json", a.json), ("--contact-sheet", a.contact_sheet)):
        if target and not Path(target).resolve().parent.is_dir():  # say so now, not after the whole scan
            print(f"error: {flag} {target}: folder {Path(target).parent} does not exist", file=sys.stderr)
            return 2
        if target and not os.access(Path(target).resolve().parent, os.W_OK):   # read-only file system, no rights
            print(f"error: {flag} {target}: folder {Path(target).parent} is not writable", file=sys.stderr)
            return 2
    try:
        r = inspect(a.shards, decode=not a.no_decode, rewrites_field=a.rewrites_field, show=show)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.quiet:
        for s in r["per_shard"]:
            probs = ", ".join(f"{k} {v}" for k, v in s["problems"].items()) or "ok"
            print(f"{s['shard']}: {s['samples']} samples (size file: {s['expected']}): {probs}")
    print(f"{r['shards']} shards, {r['samples']} samples, {r['samples_with_rewrites']} with rewrites")
    print(f"caption words: {r['caption_words']}")
    print(f"image width: {r['image_width']}  height: {r['image_height']}")
    print(f"duplicate captions: {r['duplicate_captions']} of {r['samples']} samples repeat an earlier caption"
          + ("; most repeated: " + ", ".join(f"{c[:40]!r} x{n}" for c, n in r["most_repeated_captions"])
             if r["most_repeated_captions"] else ""))
    for s in r["shown"][:a.show]:
        print(f"--- {s['key']}: {s['caption']!r}")
        for rw in s["rewrites"]:
            print(f"      rewrite: {rw!r}")
    if a.contact_sheet:
        from data_tools.contact_sheet import contact_sheet

        print(f"wrote {contact_sheet(r['shown'], a.contact_sheet)} ({len(r['shown'])} samples)")
    if r["ok"]:
        print("no problems found")
    else:
        print("PROBLEMS: " + ", ".join(f"{k} {v}" for k, v in r["problems"].items()))
        for ex in r["examples"]:
            print("  " + ex)
    if a.json:
        r["shown"] = [{k: v for k, v in s.items() if k != "image"} for s in r["shown"]]
        try:
            Path(a.json).write_text(json.dumps(r, indent=1))
        except OSError as e:
            print(f"error: cannot write --json {a.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
