"""Build the real-image learning benchmark: vendor icons in 15 drawing styles, captioned with their names.

    vlp data make-icon-bench --output icon_bench            # ~1.5 CPU-min once the tarballs are cached, 71 MB
    vlp data make-icon-bench --output icon_bench_quick --quick

Images: 29,861 icons from six icon sets on the npm registry (Phosphor in 6 weights, Tabler outline/filled,
Material Design Icons filled/outline, Remix line/fill, Bootstrap outline/fill, Lucide), fetched once with
`npm pack` into --cache and rasterised with cairosvg (black on white, --image-size px, 12% margin).
A caption is the vendor's icon name as words ("arrow left bold"); each sample's `.json` carries
`rewrites` made from the tags the vendors ship (aliases, Phosphor's tags and categories), so
`--use-rewrites` trains on them as a user of the project would.

Splits (seeded, written to `splits.json`):
  held-out styles     Lucide, Bootstrap (outline and fill) and Phosphor duotone never appear in training;
  held-out concepts   --heldout-concepts concepts drawn by at least two of the training sets never
                      appear in training, in any style.
Output (`--output`):
  train/              training shards written by make_shards (`.jpg`, `.txt` caption, `.json` with rewrites,
                      concept, style), `sizes.json`;
  eval/icons_unseen_concepts   zero-shot classification of held-out concepts in training styles;
  eval/icons_unseen_styles     zero-shot classification of training concepts in held-out styles;
  eval/icons_category          Phosphor's category (18 classes) of held-out-concept icons;
  eval/icons_retrieval         text<->image retrieval of held-out concepts (name, "... icon", tags);
each in CLIP_benchmark's webdataset layout (read by `eval_zeroshot.py` and `clip_benchmark` alike).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from data_tools.icon_sources import SETS, Icon, SourceError, load_icons
from data_tools.bench_sets import write_classification, write_retrieval, write_train
from vlp.flags import Parser

HELDOUT_STYLES = ("lucide-outline", "bi-outline", "bi-fill", "ph-duotone")
TEMPLATES = ["a {c} icon.", "an icon of {c}.", "{c}", "a pictogram of {c}."]
CATEGORY_TEMPLATES = ["a {c} icon.", "an icon about {c}.", "{c}"]
FULL = {"train_size": 12000, "heldout_concepts": 200, "style_classes": 300, "per_class": 4}
QUICK = {"train_size": 3000, "heldout_concepts": 60, "style_classes": 80, "per_class": 3}


def words(name: str) -> str:
    return " ".join(name.replace("-", " ").split())


def render_png(icon: Icon, size: int, margin: float = 0.12) -> bytes:
    """The icon drawn black on white, centred in a square of `size` px with `margin` of it free on each side."""
    import cairosvg

    left, top, w, h = icon.box
    side = max(w, h) / (1 - 2 * margin)
    x, y = left - (side - w) / 2, top - (side - h) / 2
    wrapper = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
               f'viewBox="{x} {y} {side} {side}" color="#000000">'
               f'<rect x="{x}" y="{y}" width="{side}" height="{side}" fill="#ffffff"/>{icon.body}</svg>')
    png = cairosvg.svg2png(bytestring=wrapper.encode("utf-8"))
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")  # drop alpha: every reader sees the same pixels
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def rewrites_of(icon: Icon, rng: random.Random, k: int = 4) -> list[str]:
    """Other phrasings from what the vendor ships: the concept as an icon, aliases, tags, categories."""
    c = words(icon.concept)
    out = [f"{c} icon"]
    out += [f"{t} icon" for t in icon.tags if " " in t or t.isalpha()][:2]
    tags = [t for t in icon.tags if t != c]
    if tags:
        out.append(f"{c}: " + ", ".join(rng.sample(tags, min(3, len(tags)))))
    cats = ([icon.category] if icon.category else []) + [x.split(" / ")[0].lower() for x in icon.categories]
    if cats:
        out.append(f"{c}, {cats[0]}")
    seen, uniq = {words(icon.name)}, []
    for r in out:
        if r not in seen:
            seen.add(r)
            uniq.append(r)
    return uniq[:k]


def split(icons: list[Icon], n_heldout: int, seed: int) -> tuple[set[str], list[Icon], list[Icon]]:
    """-> (held-out concepts, icons in training styles, icons in held-out styles)."""
    seen_styles = [i for i in icons if i.style not in HELDOUT_STYLES]
    unseen_styles = [i for i in icons if i.style in HELDOUT_STYLES]
    sources = defaultdict(set)
    for i in seen_styles:
        sources[i.concept].add(i.source)
    eligible = sorted(c for c, s in sources.items() if len(s) >= 2)
    if len(eligible) < n_heldout:
        raise SourceError(f"only {len(eligible)} concepts are drawn by two training sets; "
                          f"--heldout-concepts {n_heldout} is too many")
    heldout = set(random.Random(seed).sample(eligible, n_heldout))
    return heldout, seen_styles, unseen_styles


def _by_concept(icons: list[Icon]) -> dict[str, list[Icon]]:
    out = defaultdict(list)
    for i in icons:
        out[i.concept].append(i)
    return out


def build(output: str | Path, cache: str | Path, *, train_size: int, heldout_concepts: int, style_classes: int,
          per_class: int, image_size: int = 96, seed: int = 0, per_shard: int = 2000, progress: bool = True) -> dict:
    out = Path(output)
    if (out / "train").exists() and any((out / "train").glob("*.tar")):
        raise SourceError(f"{out} already holds a benchmark (choose another --output or delete it)")
    rng = random.Random(seed)
    icons = load_icons(Path(cache))
    heldout, seen_styles, unseen_styles = split(icons, heldout_concepts, seed)

    # training: a seeded sample of the training-style icons of the other concepts
    pool = [i for i in seen_styles if i.concept not in heldout]
    train = rng.sample(pool, min(train_size, len(pool)))
    train_concepts = {i.concept for i in train}
    t0 = time.time()
    rows = [{"png": render_png(icon, image_size), "caption": words(icon.name), "rewrites": rewrites_of(icon, rng),
             "concept": icon.concept, "style": icon.style, "icon": f"{icon.source}:{icon.name}"} for icon in train]
    stats = write_train(rows, out / "train", per_shard, progress)
    t_train = time.time() - t0

    ev = out / "eval"
    counts = {}
    # held-out concepts, training styles
    by_c = _by_concept(seen_styles)
    classes = sorted(heldout)
    samples = [(render_png(i, image_size), k) for k, c in enumerate(classes)
               for i in rng.sample(by_c[c], min(per_class, len(by_c[c])))]
    counts["icons_unseen_concepts"] = write_classification(ev / "icons_unseen_concepts", [words(c) for c in classes],
                                                           samples, TEMPLATES)
    # training concepts, held-out styles
    by_u = _by_concept(unseen_styles)
    cands = sorted(c for c in by_u if c in train_concepts)
    classes = sorted(rng.sample(cands, min(style_classes, len(cands))))
    samples = [(render_png(i, image_size), k) for k, c in enumerate(classes)
               for i in rng.sample(by_u[c], min(per_class, len(by_u[c])))]
    counts["icons_unseen_styles"] = write_classification(ev / "icons_unseen_styles", [words(c) for c in classes],
                                                         samples, TEMPLATES)
    # category of held-out-concept Phosphor icons (all weights)
    ph = [i for i in icons if i.source == "ph" and i.concept in heldout and i.category]
    cats = sorted({i.category for i in icons if i.source == "ph" and i.category})
    samples = [(render_png(i, image_size), cats.index(i.category)) for i in sorted(ph, key=lambda i: i.name)]
    counts["icons_category"] = write_classification(ev / "icons_category", cats, samples, CATEGORY_TEMPLATES)
    # retrieval: one icon per held-out concept, several captions
    samples = []
    for c in sorted(heldout):
        icon = rng.choice(by_c[c])
        caps = [words(icon.name), f"{words(c)} icon"]
        tags = [t for t in icon.tags if t != words(c)]
        if tags:
            caps.append(f"{words(c)}: " + ", ".join(tags[:3]))
        samples.append((render_png(icon, image_size), caps))
    counts["icons_retrieval"] = write_retrieval(ev / "icons_retrieval", samples)

    summary = {
        "seed": seed, "image_size": image_size, "sources": {s: SETS[s][0] for s in SETS},
        "heldout_styles": list(HELDOUT_STYLES), "heldout_concepts": sorted(heldout),
        "train": {"samples": stats["written"], "concepts": len(train_concepts), "train_data": stats["train_data"],
                  "styles": sorted({i.style for i in train}), "seconds": round(t_train, 1)},
        "eval": {k: {"path": str(ev / k), "samples": v} for k, v in counts.items()},
    }
    (out / "splits.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--output", "--out", dest="output", required=True, help="folder to write the benchmark into")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "vlp" / "npm"),
                   help="folder for the npm tarballs (fetched once; default ~/.cache/vlp/npm)")
    p.add_argument("--quick", action="store_true", help="small sizes for a few-minute benchmark run")
    p.add_argument("--train-size", type=int, help=f"training images (default {FULL['train_size']}, "
                                                   f"quick {QUICK['train_size']})")
    p.add_argument("--heldout-concepts", type=int, help=f"concepts kept out of training (default "
                                                         f"{FULL['heldout_concepts']}, quick {QUICK['heldout_concepts']})")
    p.add_argument("--style-classes", type=int, help="classes of the held-out-style set "
                                                      f"(default {FULL['style_classes']}, quick {QUICK['style_classes']})")
    p.add_argument("--per-class", type=int, help="images per class in the zero-shot sets "
                                                  f"(default {FULL['per_class']}, quick {QUICK['per_class']})")
    p.add_argument("--image-size", type=int, default=96, help="rendered image side in px (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    sizes = dict(QUICK if a.quick else FULL)
    for k in sizes:
        if getattr(a, k) is not None:
            sizes[k] = getattr(a, k)
    try:
        if min(sizes.values()) < 1 or a.image_size < 8:
            raise SourceError("sizes must be positive and --image-size at least 8")
        try:
            import cairosvg  # noqa: F401
        except (ImportError, OSError) as e:
            raise SourceError(f"rendering SVG needs cairosvg and libcairo (pip install cairosvg; "
                              f"apt-get install libcairo2): {str(e).splitlines()[0]}") from None
        s = build(a.output, a.cache, image_size=a.image_size, seed=a.seed, progress=not a.no_progress, **sizes)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train: {s['train']['samples']} images of {s['train']['concepts']} concepts in "
          f"{len(s['train']['styles'])} styles -> --train-data '{s['train']['train_data']}'")
    for k, v in s["eval"].items():
        print(f"eval:  {k}: {v['samples']} images -> {v['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
