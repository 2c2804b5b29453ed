"""Build the glyph learning benchmark: characters drawn in 35 font families, captioned with their Unicode names.

    vlp data make-glyph-bench --output glyph_bench            # ~15 s once the tarballs are cached, 48 MB
    vlp data make-glyph-bench --output glyph_bench_quick --quick

Images: 473 characters (Latin letters with and without diacritics, Greek, Cyrillic, digits, punctuation,
symbols) in 35 Google Fonts families of seven genres (serif, sans, slab, mono, script/handwriting, display,
condensed) from the npm registry's `@fontsource/<family>` packages, each in up to three variants (regular,
bold, italic), fetched once with `npm pack` into --cache and drawn with Pillow black on white at --image-size
px (12% margin). A face draws a character only where its font maps it (no tofu). A caption is the
character's Unicode name in lower case ("latin small letter a with acute"); each sample's `.json` carries
`concept` (the character), `style` (the family), `variant`, `script` and `rewrites` built from the name
("the letter á", "small a with acute", ...), so `--use-rewrites` trains on them.

Splits (seeded, written to `splits.json`):
  held-out styles     six families of six genres (HELDOUT_STYLES) never appear in training;
  held-out concepts   --heldout-concepts characters, spread over the scripts and classes, never appear in
                      training in any style; each word of their names occurs in a trained character's name;
  validation pairs    --val-classes trained characters, each kept out of training in --per-class training
                      families (all their variants): choose recipes on `glyphs_val`, never on the held-out sets.
Output (`--output`):
  train/              training shards written by make_shards (`.jpg`, `.txt` caption, `.json`), `sizes.json`;
  eval/glyphs_val              zero-shot among the validation characters, in families trained on but not with them;
  eval/glyphs_unseen_concepts  zero-shot classification of held-out characters in training families;
  eval/glyphs_unseen_styles    zero-shot classification of trained characters in held-out families;
  eval/glyphs_category         script or class (latin/greek/cyrillic letter, digit, punctuation, symbol) of
                               held-out-character glyphs in all families, balanced;
  eval/glyphs_retrieval        text<->image retrieval of held-out characters (name and rewrites);
each in CLIP_benchmark's webdataset layout (read by `eval_zeroshot.py` and `clip_benchmark` alike).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

from data_tools import glyph_sources as G
from data_tools.bench_sets import write_classification, write_retrieval, write_train
from data_tools.npm_cache import SourceError
from vlp.flags import Parser

HELDOUT_STYLES = ("eb-garamond", "ubuntu", "bitter", "jetbrains-mono", "lobster", "yanone-kaffeesatz")
TEMPLATES = ["the character {c}.", "{c}", "a glyph of {c}.", "{c}, in some font."]
CATEGORY_TEMPLATES = ["a {c}.", "{c}", "a glyph: a {c}."]
FULL = {"train_size": 9600, "heldout_concepts": 80, "style_classes": 200, "val_classes": 150, "per_class": 3,
        "category_per_class": 60}
QUICK = {"train_size": 3000, "heldout_concepts": 40, "style_classes": 80, "val_classes": 60, "per_class": 2,
         "category_per_class": 20}
Glyph = tuple  # (character, Face)


def pick_heldout(chars: list[str], n: int, rng: random.Random) -> list[str]:
    """n characters spread round-robin over the categories, each kept only while every word of its name still
    occurs in the name of a character left for training."""
    left = Counter(w for c in chars for w in set(G.name(c).split()))
    queues = defaultdict(list)
    for c in chars:
        queues[G.category(c)].append(c)
    for q in queues.values():
        rng.shuffle(q)
    chosen: list[str] = []
    while len(chosen) < n and any(queues.values()):
        for cat in sorted(queues):
            while queues[cat] and len(chosen) < n:
                c = queues[cat].pop()
                words = set(G.name(c).split())
                if all(left[w] > 1 for w in words):
                    left.subtract(words)
                    chosen.append(c)
                    break
    if len(chosen) < n:
        raise SourceError(f"only {len(chosen)} characters can be held out with their words still trained; "
                          f"--heldout-concepts {n} is too many")
    return sorted(chosen)


def split(glyphs: list[Glyph], sizes: dict, rng: random.Random) -> dict:
    """-> held-out concepts, validation (character, family) pairs, training pool, held-out-style glyphs."""
    seen = [g for g in glyphs if g[1].family not in HELDOUT_STYLES]
    unseen = [g for g in glyphs if g[1].family in HELDOUT_STYLES]
    fams = defaultdict(set)
    for ch, face in seen:
        fams[ch].add(face.family)
    eligible = sorted(c for c, f in fams.items() if len(f) >= 2)
    heldout = set(pick_heldout(eligible, sizes["heldout_concepts"], rng))
    rest = [c for c in eligible if c not in heldout and len(fams[c]) > sizes["per_class"]]
    if len(rest) < sizes["val_classes"]:
        raise SourceError(f"only {len(rest)} characters can give validation pairs; --val-classes is too many")
    val_chars = sorted(rng.sample(rest, sizes["val_classes"]))
    val_pairs = {(c, f) for c in val_chars for f in rng.sample(sorted(fams[c]), sizes["per_class"])}
    pool = [g for g in seen if g[0] not in heldout and (g[0], g[1].family) not in val_pairs]
    return {"heldout": heldout, "val_chars": val_chars, "val_pairs": val_pairs, "seen": seen, "unseen": unseen,
            "pool": pool}


def sample_train(pool: list[Glyph], n: int, rng: random.Random) -> list[Glyph]:
    """n glyphs of the pool: one of each character first (so every trainable character, and every word of the
    held-out characters' names, is trained on when n allows), then a seeded sample of the rest."""
    by_char = defaultdict(list)
    for g in pool:
        by_char[g[0]].append(g)
    first = [rng.choice(by_char[c]) for c in sorted(by_char)]
    rng.shuffle(first)
    taken = {(ch, face.family, face.variant) for ch, face in first}
    rest = [g for g in pool if (g[0], g[1].family, g[1].variant) not in taken]
    out = first[:n] + rng.sample(rest, max(0, min(n - len(first), len(rest))))
    rng.shuffle(out)
    return out


def _row(ch: str, face, size: int) -> dict:
    return {"png": G.render_png(face, ch, size), "caption": G.name(ch), "rewrites": G.rewrites_of(ch),
            "concept": ch, "style": face.family, "variant": face.variant, "genre": face.genre,
            "script": G.category(ch)}


def _zero_shot(rng, by_char: dict, classes: list[str], per_class: int, size: int) -> list[tuple[bytes, int]]:
    return [(G.render_png(face, ch, size), k) for k, ch in enumerate(classes)
            for ch, face in rng.sample(by_char[ch], min(per_class, len(by_char[ch])))]


def write_eval(ev: Path, s: dict, train_chars: set, sizes: dict, size: int, rng: random.Random) -> dict:
    """The five held-out sets; -> their sizes."""
    def by_char(glyphs, keep=lambda g: True):
        out = defaultdict(list)
        for g in glyphs:
            if keep(g):
                out[g[0]].append(g)
        return out

    n, pc = {}, sizes["per_class"]
    val = by_char(s["seen"], lambda g: (g[0], g[1].family) in s["val_pairs"])
    n["glyphs_val"] = write_classification(ev / "glyphs_val", [G.name(c) for c in s["val_chars"]],
                                           _zero_shot(rng, val, s["val_chars"], pc, size), TEMPLATES)
    seen, classes = by_char(s["seen"]), sorted(s["heldout"])
    n["glyphs_unseen_concepts"] = write_classification(ev / "glyphs_unseen_concepts", [G.name(c) for c in classes],
                                                       _zero_shot(rng, seen, classes, pc, size), TEMPLATES)
    unseen = by_char(s["unseen"])
    cands = sorted(c for c in unseen if c in train_chars)
    classes = sorted(rng.sample(cands, min(sizes["style_classes"], len(cands))))
    n["glyphs_unseen_styles"] = write_classification(ev / "glyphs_unseen_styles", [G.name(c) for c in classes],
                                                     _zero_shot(rng, unseen, classes, pc, size), TEMPLATES)
    by_cat = defaultdict(list)
    for g in s["seen"] + s["unseen"]:
        if g[0] in s["heldout"]:
            by_cat[G.category(g[0])].append(g)
    cats = sorted(by_cat)
    samples = [(G.render_png(face, ch, size), k) for k, cat in enumerate(cats)
               for ch, face in rng.sample(by_cat[cat], min(sizes["category_per_class"], len(by_cat[cat])))]
    n["glyphs_category"] = write_classification(ev / "glyphs_category", cats, samples, CATEGORY_TEMPLATES)
    samples = []
    for ch in sorted(s["heldout"]):
        _, face = rng.choice(seen[ch])
        samples.append((G.render_png(face, ch, size), [G.name(ch), *G.rewrites_of(ch)[1:3]]))
    n["glyphs_retrieval"] = write_retrieval(ev / "glyphs_retrieval", samples)
    return n


def build(output: str | Path, cache: str | Path, *, train_size: int, heldout_concepts: int, style_classes: int,
          val_classes: int, per_class: int, category_per_class: int, image_size: int = 96, seed: int = 0,
          per_shard: int = 2000, families: list[str] | None = None, progress: bool = True) -> dict:
    out = Path(output)
    if (out / "train").exists() and any((out / "train").glob("*.tar")):
        raise SourceError(f"{out} already holds a benchmark (choose another --output or delete it)")
    sizes = {"heldout_concepts": heldout_concepts, "style_classes": style_classes, "val_classes": val_classes,
             "per_class": per_class, "category_per_class": category_per_class}
    rng = random.Random(seed)
    faces = G.load_faces(Path(cache), families)
    glyphs = [(ch, face) for face in faces for ch in G.characters() if face.draws(ch)]
    s = split(glyphs, sizes, rng)
    train = sample_train(s["pool"], train_size, rng)
    t0 = time.time()
    if progress:
        print(f"rendering {len(train)} training glyphs of {len(faces)} faces", file=sys.stderr, flush=True)
    stats = write_train([_row(ch, face, image_size) for ch, face in train], out / "train", per_shard, progress)
    t_train = time.time() - t0
    train_chars = {ch for ch, _ in train}
    counts = write_eval(out / "eval", s, train_chars, sizes, image_size, rng)
    fams = sorted({f.family for f in faces})
    summary = {
        "seed": seed, "image_size": image_size, "sizes": sizes,
        "sources": {f: G.spec(f) for f in fams}, "genres": {f: G.FAMILIES[f] for f in fams},
        "variants": list(G.VARIANTS), "heldout_styles": [f for f in HELDOUT_STYLES if f in fams],
        "heldout_concepts": sorted(s["heldout"]), "heldout_concept_names": [G.name(c) for c in sorted(s["heldout"])],
        "val_pairs": sorted([c, f] for c, f in s["val_pairs"]),
        "train": {"samples": stats["written"], "concepts": len(train_chars), "train_data": stats["train_data"],
                  "styles": sorted({f.family for _, f in train}), "seconds": round(t_train, 1)},
        "eval": {k: {"path": str(out / "eval" / k), "samples": v} for k, v in counts.items()},
    }
    (out / "splits.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--output", "--out", dest="output", required=True, help="folder to write the benchmark into")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "vlp" / "npm"),
                   help="folder for the npm tarballs (fetched once; default ~/.cache/vlp/npm)")
    p.add_argument("--quick", action="store_true", help="small sizes for a few-minute benchmark run")
    helps = {"train_size": "training images", "heldout_concepts": "characters kept out of training",
             "style_classes": "classes of the held-out-style set", "val_classes": "classes of the validation set",
             "per_class": "images per class in the zero-shot sets (and validation families per character)",
             "category_per_class": "images per class of the category set"}
    for k, h in helps.items():
        p.add_argument("--" + k.replace("_", "-"), type=int, help=f"{h} (default {FULL[k]}, quick {QUICK[k]})")
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
        s = build(a.output, a.cache, image_size=a.image_size, seed=a.seed, progress=not a.no_progress, **sizes)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train: {s['train']['samples']} images of {s['train']['concepts']} characters in "
          f"{len(s['train']['styles'])} families -> --train-data '{s['train']['train_data']}'")
    for k, v in s["eval"].items():
        print(f"eval:  {k}: {v['samples']} images -> {v['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
