"""A web-like noisy pool from clean shards, for showing what `vlp data filter` is worth.

    vlp data make-noisy-pool --input icon_bench/train --output noisy_pool --mismatched 0.3 --boilerplate 0.2 \
        --near-dups 0.5

Every input image appears once, each image's bytes unchanged; as shares of the input count (seeded):
  mismatched   images whose captions are shuffled among themselves (each gets another one's caption);
  boilerplate  images captioned with one of a few web boilerplate strings ("click to enlarge", ...);
  clean        the rest, with their own captions;
  near-dups    added: an input sample again with its own caption, the image re-encoded (JPEG quality
               55-85), resized (75-100 %) and cropped a few pixels (a re-upload).
Every sample's `.json` says which kind it is (`noise`: clean / mismatched / near_dup / boilerplate) so the
result can be scored afterwards; nothing in vlp's filter reads that field. Samples are interleaved at random.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path
from typing import Optional

from vlp.flags import Parser

BOILERPLATE = ("click to enlarge", "image", "untitled", "stock vector illustration", "free download",
               "thumbnail", "photo", "view larger image")


def near_duplicate(jpg: bytes, rng: random.Random) -> bytes:
    """A re-encoded, resized, slightly cropped copy of an image (what a re-upload looks like)."""
    from PIL import Image

    im = Image.open(io.BytesIO(jpg)).convert("RGB")
    w, h = im.size
    c = [rng.randint(0, max(0, s // 24)) for s in (w, h, w, h)]
    im = im.crop((c[0], c[1], w - c[2], h - c[3]))
    s = rng.uniform(0.75, 1.0)
    im = im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=rng.randint(55, 85))
    return buf.getvalue()


def make_noisy_pool(inp: str, output: str, mismatched: float = 0.3, near_dups: float = 0.5,
                    boilerplate: float = 0.2, seed: int = 0, per_shard: int = 2000) -> dict:
    from vlp.data.shards import shard_urls
    from vlp.data.tario import ShardWriter, read_shard

    rng = random.Random(seed)
    clean = []
    for url in shard_urls(inp):
        for s in read_shard(url):
            clean.append((s.key, dict(s.files)))
    if not clean:
        raise SystemExit(f"error: no samples in {inp}")
    n = len(clean)
    order = rng.sample(range(n), n)
    n_mis, n_bp = round(mismatched * n), round(boilerplate * n)
    mis, bp = order[:n_mis], set(order[n_mis:n_mis + n_bp])
    caps = [clean[i][1]["txt"] for i in mis]
    shuffled = dict(zip(mis, caps[1:] + caps[:1]))   # a cyclic shift: no image keeps its own caption
    out = []
    for i, (key, files) in enumerate(clean):
        if i in shuffled:
            out.append((f"c{key}", {"jpg": files["jpg"], "txt": shuffled[i]}, "mismatched"))
        elif i in bp:
            out.append((f"c{key}", {"jpg": files["jpg"], "txt": rng.choice(BOILERPLATE).encode()}, "boilerplate"))
        else:
            out.append((f"c{key}", files, "clean"))
    for i in range(round(near_dups * n)):
        _, a = rng.choice(clean)
        out.append((f"d{i:08d}", {"jpg": near_duplicate(a["jpg"], rng), "txt": a["txt"]}, "near_dup"))
    rng.shuffle(out)
    dest = Path(output)
    dest.mkdir(parents=True, exist_ok=True)
    with ShardWriter(str(dest / "%05d.tar"), per_shard) as sink:
        for key, files, kind in out:
            meta = {"key": key, "caption": files["txt"].decode("utf-8"), "noise": kind}
            sink.write(key, {"jpg": files["jpg"], "txt": files["txt"], "json": json.dumps(meta).encode()})
        sizes = dict(sink.sizes)
    (dest / "sizes.json").write_text(json.dumps(sizes, indent=1))
    counts = {k: sum(1 for o in out if o[2] == k) for k in ("clean", "mismatched", "near_dup", "boilerplate")}
    last = len(sizes) - 1
    spec = str(dest / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))
    return {"samples": len(out), "counts": counts, "train_data": spec}


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="clean shards (a spec)")
    p.add_argument("--output", required=True)
    p.add_argument("--mismatched", type=float, default=0.3, help="share of the input count (default 0.3)")
    p.add_argument("--boilerplate", type=float, default=0.2, help="share of the input count (default 0.2)")
    p.add_argument("--near-dups", type=float, default=0.5, help="added copies, share of the input count (default 0.5)")
    p.add_argument("--per-shard", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    stats = make_noisy_pool(a.input, a.output, a.mismatched, a.near_dups, a.boilerplate, a.seed, a.per_shard)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
