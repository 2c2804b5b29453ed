"""vlp's own pools of in-context example pairs (`source => target`) for LLM caption rewriting.

Written for this project. Each pool has one style, so k pools give k differently worded rewrites
of every caption (LaCLIP used four pools: ChatGPT, Bard, MSCOCO and human rewrites).
Users can add their own with `load_pool_file` (lines `source => target`, or JSONL
`{"source": ..., "target": ...}`).
"""
from __future__ import annotations

import json
from pathlib import Path

MARKER = "=>"

POOLS: dict[str, list[tuple[str, str]]] = {
    # a full, plain sentence that spells out what the alt text implies
    "descriptive": [
        ("red car parked street night", "A red car is parked along a city street at night."),
        ("golden retriever puppy grass", "A golden retriever puppy is playing on a green lawn."),
        ("wedding cake three tiers flowers", "A three-tier wedding cake decorated with fresh flowers."),
        ("old wooden boat lake morning fog", "An old wooden boat rests on a foggy lake in the early morning."),
        ("kids soccer practice park", "A group of children practicing soccer in a public park."),
        ("blue square small left", "A small blue square sits on the left side of the picture."),
        ("mountain cabin snow winter", "A small cabin in the mountains covered with winter snow."),
        ("fresh bread bakery shelf", "Loaves of freshly baked bread lined up on a bakery shelf."),
        ("woman reading book cafe window", "A woman reads a book by the window of a cafe."),
        ("yellow triangle large top", "A large yellow triangle is drawn near the top of the image."),
        ("city skyline sunset river", "The city skyline at sunset, seen from across the river."),
        ("vintage bicycle brick wall", "A vintage bicycle leaning against an old brick wall."),
    ],
    # short and to the point, different words where possible
    "concise": [
        ("A photo of my dog sleeping on the couch after a long walk", "dog asleep on a sofa"),
        ("Beautiful view of the ocean from our hotel balcony in Greece", "sea view from a hotel balcony"),
        ("there is a large green circle in the middle of the picture", "big green disc in the center"),
        ("Man in a suit talking on his phone while crossing the street", "businessman on the phone crossing a road"),
        ("Close-up of a bowl of ramen with egg and green onions", "bowl of ramen, close up"),
        ("a small white cross on the right on a grey background", "little white plus sign, right side"),
        ("Two cats curled up together in a cardboard box", "pair of cats in a box"),
        ("Aerial shot of a winding road through an autumn forest", "road through fall woods from above"),
        ("Young girl blowing out candles on her birthday cake", "child blowing out birthday candles"),
        ("a purple diamond below an orange square", "violet rhombus under an amber box"),
        ("Snow-covered pine trees under a clear blue sky", "snowy pines, blue sky"),
        ("An elderly couple walking hand in hand on the beach", "old couple strolling on the shore"),
    ],
    # how a photographer or a stock site might title the picture
    "photographic": [
        ("dog beach", "Photograph of a dog running along a sandy beach."),
        ("coffee latte art", "Top-down shot of a latte with leaf-shaped foam art."),
        ("green circle small right", "Picture of a small green circle on the right-hand side."),
        ("bridge fog", "Long-exposure photo of a bridge disappearing into fog."),
        ("street market fruit", "Snapshot of colourful fruit stalls at a street market."),
        ("black square large bottom", "Image of a large black square near the bottom edge."),
        ("cat window", "Portrait of a cat looking out of a sunny window."),
        ("lighthouse storm", "Dramatic picture of a lighthouse during a storm."),
        ("tulips field", "Wide-angle photo of rows of tulips in a field."),
        ("skateboarder ramp", "Action shot of a skateboarder in the air above a ramp."),
        ("red triangle above blue circle", "Illustration showing a red triangle above a blue circle."),
        ("library shelves", "Interior view of tall library shelves full of books."),
    ],
    # a caption as an annotator describing the scene would write it
    "scene": [
        ("yellow diamond large center", "There is a big yellow diamond in the center of the image."),
        ("sunset beach palm trees", "Palm trees stand on a beach while the sun goes down."),
        ("family picnic park summer", "A family is having a picnic in a park on a summer day."),
        ("orange cross small top", "A small orange cross can be seen at the top."),
        ("train station crowd", "Many people are waiting on the platform of a train station."),
        ("chef kitchen cooking pasta", "A chef is cooking pasta in a restaurant kitchen."),
        ("white circle left black square right", "A white circle is on the left and a black square is on the right."),
        ("horse field fence", "A horse is standing in a field next to a wooden fence."),
        ("rainy street umbrellas", "People with umbrellas are walking down a rainy street."),
        ("laptop desk plant", "A laptop sits on a desk beside a small potted plant."),
        ("birthday party balloons", "Colorful balloons fill the room at a birthday party."),
        ("purple square small bottom", "A small purple square is located at the bottom of the frame."),
    ],
}

DEFAULT_POOLS = tuple(POOLS)


def load_pool_file(path: str) -> list[tuple[str, str]]:
    """Pairs from a file: `source => target` per line, or JSONL objects with `source` and `target`."""
    pairs: list[tuple[str, str]] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                src, tgt = str(obj["source"]), str(obj["target"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected {{\"source\": ..., \"target\": ...}}") from None
        else:
            if line.count(MARKER) != 1:
                raise ValueError(f"{path}:{lineno}: expected 'source {MARKER} target'")
            src, tgt = (s.strip() for s in line.split(MARKER))
        if not src or not tgt:
            raise ValueError(f"{path}:{lineno}: empty source or target")
        pairs.append((src, tgt))
    if len(pairs) < 3:
        raise ValueError(f"{path}: a pool needs at least 3 example pairs (found {len(pairs)})")
    return pairs


def resolve_pools(specs: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Names of built-in pools or `NAME=FILE` / `FILE` for pool files -> ordered {name: pairs}."""
    out: dict[str, list[tuple[str, str]]] = {}
    for spec in specs:
        if spec in POOLS:
            name, pairs = spec, POOLS[spec]
        else:
            name, sep, path = spec.partition("=")
            if not sep:
                path, name = spec, Path(spec).stem
            if not Path(path).is_file():
                raise ValueError(f"unknown pool {spec!r}: not one of {', '.join(POOLS)} nor a pool file")
            pairs = load_pool_file(path)
        if name in out:
            raise ValueError(f"pool name {name!r} given twice")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"pool name {name!r}: use letters, digits, '-' and '_' only")
        out[name] = pairs
    return out
