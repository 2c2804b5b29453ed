"""Turn (image, caption) pairs into webdataset shards that vlp (and open_clip) train from.

    vlp data make-shards --input cc3m.tsv --output shards/ --per-shard 10000 --resize-max 512
    vlp data make-shards --input pairs_folder/ --output shards/

Input: a CSV/TSV/parquet/JSONL table with an image-path column and a caption column (other columns are
kept in each sample's `.json`), or a folder of `NAME.jpg` + `NAME.txt` pairs (`NAME.json` kept if present).
Each sample is written as `{key}.jpg` (JPEG), `{key}.txt` (caption), `{key}.json` (`key`, `caption`,
`source` (the image path as given), `width`, `height`, extra columns). Keys are the 0-based input row
number, zero-padded to 9 digits: stable across reruns and unique. `sizes.json` records each shard's sample
count (open_clip's format), `stats.json` the run summary. Unreadable images and empty captions are skipped
and counted, never fatal. Shards are written into a hidden folder inside --output and moved into place only
when the whole input was read and at least one sample written; `--overwrite` replaces only the shards of
this `--prefix` (and their sizes.json entries), never other files. make_shards reads local files: for image
URLs use img2dataset, which downloads and writes shards itself.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
from collections import Counter
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator, Optional

from data_tools import staging as staging_folders
from data_tools.outputs import check_name, own_shards, swap_in
from vlp.data.images import IMAGE_FILE_SUFFIXES
from vlp.data.tario import ShardWriter
from vlp.flags import Parser

STAGING_PREFIX = ".make_shards-"

IMAGE_COLS = ("image", "image_path", "filepath", "file", "path", "relpath", "img", "filename", "url")
CAPTION_COLS = ("caption", "text", "title", "txt", "captions")


class InputError(Exception):
    pass


def _read_table(path: Path, no_header: bool):
    import pandas as pd

    suf = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    header = None if no_header else "infer"
    try:
        if suf.startswith(".parquet"):
            df = pd.read_parquet(path)
        elif suf.startswith(".jsonl") or suf.startswith(".json"):
            df = pd.read_json(path, lines=True)
        elif suf.startswith(".tsv"):
            df = pd.read_csv(path, sep="\t", header=header, dtype=str, keep_default_na=False, quoting=3)
        elif suf.startswith(".csv"):
            df = pd.read_csv(path, header=header, dtype=str, keep_default_na=False)
        else:
            raise InputError(f"{path}: unknown table format (use .csv, .tsv, .parquet or .jsonl)")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    if no_header:
        df.columns = ["image", "caption"] + [f"col{i}" for i in range(2, len(df.columns))]
    df.columns = [str(c) for c in df.columns]
    return df


def _pick(cols: list[str], given: Optional[str], candidates, what: str, path) -> str:
    if given:
        if given not in cols:
            raise InputError(f"{path}: no column '{given}' (columns: {', '.join(cols)})")
        return given
    lower = {c.lower(): c for c in cols}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise InputError(f"{path}: cannot tell which column holds the {what}; name it with --{what}-col "
                     f"(columns: {', '.join(cols)})")


def iter_table(path: Path, image_col, caption_col, image_root: Optional[Path], no_header: bool) -> Iterator[dict]:
    df = _read_table(path, no_header)
    cols = list(df.columns)
    ic = _pick(cols, image_col, IMAGE_COLS, "image", path)
    cc = _pick(cols, caption_col, CAPTION_COLS, "caption", path)
    root = image_root if image_root is not None else path.parent
    extra_cols = [c for c in cols if c not in (ic, cc)]
    for row in df.itertuples(index=False, name=None):
        rec = dict(zip(cols, row))
        src = str(rec[ic])
        p = Path(src)
        extras = {c: _jsonable(rec[c]) for c in extra_cols}
        yield {"source": src, "path": str(p if p.is_absolute() else root / p), "caption": rec[cc], "extra": extras}


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return v.item() if hasattr(v, "item") else str(v)


def iter_folder(folder: Path) -> Iterator[dict]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file())
    for p in files:
        txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
        caption = txt.read_bytes() if txt.is_file() else None
        extra = {}
        if js.is_file():
            try:
                extra = json.loads(js.read_text())
                extra = extra if isinstance(extra, dict) else {"meta": extra}
            except (ValueError, UnicodeDecodeError):
                extra = {}
        yield {"source": str(p.relative_to(folder)), "path": str(p), "caption": caption, "extra": extra}


_OPTS: dict = {}


def _init(opts):
    _OPTS.update(opts)


def process(rec: dict):
    """-> (jpeg bytes, caption, info) or (None, reason, None)."""
    from PIL import Image

    from vlp.data.errors import SkipSample
    from vlp.data.images import open_image, orientation, upright
    from vlp.data.pixels import to_rgb

    cap = rec["caption"]
    if cap is None:
        return None, "missing_caption", None
    if isinstance(cap, bytes):
        try:
            cap = cap.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_caption_encoding", None
    if not isinstance(cap, str):
        cap = "" if cap != cap else str(cap)  # NaN -> empty
    cap = " ".join(cap.split())
    if not cap:
        return None, "empty_caption", None
    try:
        data = Path(rec["path"]).read_bytes()
    except OSError:
        return None, "missing_image", None
    try:
        im = open_image(data)
    except SkipSample as s:
        return None, s.reason, None
    try:
        w0, h0 = im.size
        shorter, longest = _OPTS.get("resize_shorter"), _OPTS.get("resize_max")
        scale = 1.0
        if shorter and min(w0, h0) > shorter:
            scale = shorter / min(w0, h0)
        if longest and max(w0, h0) * scale > longest:
            scale = longest / max(w0, h0)
        size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
        if scale < 1 and im.format == "JPEG":
            im.draft("RGB", size)
        im.load()
        reencode = _OPTS.get("reencode") or scale < 1 or im.format != "JPEG" or im.mode not in ("RGB", "L")
        if reencode:   # the new JPEG carries no EXIF: its pixels are turned upright here
            size = size[::-1] if orientation(im) >= 5 else size
            im = to_rgb(upright(im))   # 16-bit scaled, transparency on white (vlp.data.pixels)
            if im.size != size:
                im = im.resize(size, Image.BICUBIC, reducing_gap=3.0)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=_OPTS.get("quality", 95))
            data = buf.getvalue()
        w, h = size
    except Exception:  # noqa: BLE001 - corrupt/truncated image data
        return None, "corrupt_image", None
    return data, cap, {"width": w, "height": h, "original_width": w0, "original_height": h0}


def make_shards(inp: str, output: str, *, per_shard: int = 10000, image_col=None, caption_col=None,
                image_root=None, no_header=False, resize_shorter=None, resize_max=None, quality=95,
                reencode=False, workers=1, prefix="", overwrite=False, progress=True) -> dict:
    src = Path(inp)
    out = Path(output)
    if not src.exists():
        raise InputError(f"input not found: {inp}")
    if per_shard < 1:
        raise InputError("--per-shard must be at least 1")
    check_name(out, prefix, "--prefix", InputError)
    if own_shards(out, prefix) and not overwrite:
        raise InputError(f"{out} already holds {prefix or ''}NNNNN.tar shards (use --overwrite or another --output)")
    if src.is_dir():
        records = iter_folder(src)
    else:
        records = iter_table(src, image_col, caption_col, Path(image_root) if image_root else None, no_header)
    recs = list(records)  # the whole input is read (and checked) before anything is written
    urls = [r["source"] for r in recs if re.match(r"^[a-z][a-z0-9+.-]*://", r["source"], re.I)]
    if urls:
        raise InputError(f"{len(urls)} of {len(recs)} image paths are URLs (first: {urls[0]}): make_shards reads "
                         f"local files and does not download; img2dataset downloads them and writes shards itself")
    out.mkdir(parents=True, exist_ok=True)
    for gone in staging_folders.sweep(out, STAGING_PREFIX):
        print(f"removed {gone}: the staging folder of a make-shards run that was killed", file=sys.stderr)
    staging = staging_folders.make(out, STAGING_PREFIX)
    try:
        stats = _write(recs, staging, src, per_shard, prefix, workers, progress,
                       {"resize_shorter": resize_shorter, "resize_max": resize_max, "quality": quality,
                        "reencode": reencode})
        if stats["written"] == 0:
            sk = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
            raise InputError(f"no samples written from {src} ({stats['rows']} rows; skipped: {sk}); "
                             f"{out} is unchanged")
        swap_in(staging, out, prefix, stats)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def _write(recs: list, folder: Path, src: Path, per_shard: int, prefix: str, workers: int, progress: bool,
           opts: dict) -> dict:
    skipped: Counter = Counter()
    from vlp.progress import progress_bar

    written = 0
    with ShardWriter(str(folder / f"{prefix}%05d.tar"), per_shard) as sink:
        if workers > 1:
            pool = Pool(workers, initializer=_init, initargs=(opts,))
            results = pool.imap(process, recs, chunksize=16)
        else:
            _init(opts)
            pool, results = None, map(process, recs)
        try:
            for i, (rec, (data, cap, info)) in enumerate(progress_bar(zip(recs, results), total=len(recs), unit="img",
                                                               desc="make_shards", disable=not progress)):
                if data is None:
                    skipped[cap] += 1
                    continue
                key = f"{i:09d}"
                meta = {**rec["extra"], "key": key, "caption": cap, "source": rec["source"], **info}
                sink.write(key, {"jpg": data, "txt": cap.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")})
                written += 1
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        sizes = dict(sink.sizes)
    n = len(sizes)
    spec = str(folder / (f"{prefix}{{00000..{n - 1:05d}}}.tar" if n > 1 else f"{prefix}00000.tar"))
    return {"input": str(src), "rows": len(recs), "written": written, "shards": n,
            "skipped": dict(sorted(skipped.items())), "train_data": spec, "sizes": sizes}


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0],
                                epilog="Keys are input row numbers; sizes.json makes --train-num-samples unnecessary.")
    p.add_argument("--input", required=True, help="CSV/TSV/parquet/JSONL table, or a folder of image+caption pairs")
    p.add_argument("--output", "--out", dest="output", required=True, help="folder for the shards")
    p.add_argument("--per-shard", type=int, default=10000, help="samples per shard (default 10000)")
    p.add_argument("--image-col", help="column with image paths (default: first of %s)" % ", ".join(IMAGE_COLS))
    p.add_argument("--caption-col", help="column with captions (default: first of %s)" % ", ".join(CAPTION_COLS))
    p.add_argument("--image-root", help="folder relative image paths start from (default: the table's folder)")
    p.add_argument("--no-header", action="store_true", help="table has no header row: columns are image, caption, ...")
    p.add_argument("--resize-shorter", type=int, help="downscale so the shorter side is at most this")
    p.add_argument("--resize-max", type=int, help="downscale so the longer side is at most this")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--reencode", action="store_true", help="re-encode every image (default: only resized/non-JPEG)")
    p.add_argument("--workers", type=int, default=1, help="image worker processes")
    p.add_argument("--prefix", default="", help="shard file name prefix")
    p.add_argument("--overwrite", action="store_true", help="replace this --prefix's shards already in --output "
                                                                 "(after the new ones are written)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        if not 1 <= a.quality <= 100:
            raise InputError("--quality must be within 1..100")
        stats = make_shards(a.input, a.output, per_shard=a.per_shard, image_col=a.image_col,
                            caption_col=a.caption_col, image_root=a.image_root, no_header=a.no_header,
                            resize_shorter=a.resize_shorter, resize_max=a.resize_max, quality=a.quality,
                            reencode=a.reencode, workers=a.workers, prefix=a.prefix, overwrite=a.overwrite,
                            progress=not a.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sk = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
    print(f"wrote {stats['written']} of {stats['rows']} samples in {stats['shards']} shards; skipped: {sk}")
    print(f"--train-data '{stats['train_data']}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
