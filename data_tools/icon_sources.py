"""Real icon collections from the npm registry, read into one record per drawn icon (for make_icon_bench).

Every set comes as an Iconify JSON package (`@iconify-json/<prefix>`: `icons.json` holds each icon's
SVG body, `metadata.json` its categories). A set draws the same concept in one or more *styles*, told
apart by a name suffix (`heart-bold`, `heart-fill`, `heart-outline`); the concept is the name without
it. Tags come from what the vendors ship: Iconify aliases (other names of the same drawing),
Iconify categories, and Phosphor's own catalogue (`@phosphor-icons/core`: tags and one category per
icon). Packages are fetched once with `npm pack` (pinned versions) into a cache folder and read from
the tarballs (data_tools.npm_cache); nothing is unpacked.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.npm_cache import SourceError, fetch, read_member, tarball_name  # noqa: F401 (re-exported)

# prefix -> (npm package@version, [(name suffix, style)] tried in order; "" matches every name)
SETS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "ph": ("@iconify-json/ph@1.2.2", [("-thin", "thin"), ("-light", "light"), ("-bold", "bold"),
                                      ("-fill", "fill"), ("-duotone", "duotone"), ("", "regular")]),
    "tabler": ("@iconify-json/tabler@1.2.41", [("-filled", "filled"), ("", "outline")]),
    "mdi": ("@iconify-json/mdi@1.2.3", [("-outline", "outline"), ("", "filled")]),
    "ri": ("@iconify-json/ri@1.2.10", [("-line", "line"), ("-fill", "fill"), ("", "line")]),
    "bi": ("@iconify-json/bi@1.2.7", [("-fill", "fill"), ("", "outline")]),
    "lucide": ("@iconify-json/lucide@1.2.137", [("", "outline")]),
}
PHOSPHOR_CATALOG = "@phosphor-icons/core@2.1.1"


@dataclass
class Icon:
    source: str          # icon set prefix, e.g. "ph"
    style: str           # "ph-bold", "mdi-outline", ... (a source's drawing style)
    name: str            # the vendor's icon name, e.g. "heart-bold"
    concept: str         # the name without its style suffix, e.g. "heart"
    body: str            # the SVG body as the vendor drew it (paints with currentColor)
    box: tuple           # its viewBox: (left, top, width, height)
    tags: list[str] = field(default_factory=list)
    category: str = ""   # one vendor category where the vendor gives one (Phosphor)
    categories: list[str] = field(default_factory=list)


def _style_of(name: str, rules: list[tuple[str, str]]) -> tuple[str, str]:
    for suffix, style in rules:
        if suffix and name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], style
        if not suffix:
            return name, style
    return name, rules[-1][1]


def read_iconify(prefix: str, tgz: Path) -> list[Icon]:
    """Every drawn icon of one Iconify JSON package (aliases become tags of their parent, not icons)."""
    data = json.loads(read_member(tgz, "package/icons.json"))
    try:
        meta = json.loads(read_member(tgz, "package/metadata.json"))
    except SourceError:
        meta = {}
    rules = SETS[prefix][1]
    w0, h0 = data.get("width", 16), data.get("height", 16)
    alias_names: dict[str, list[str]] = {}
    for alias, a in data.get("aliases", {}).items():
        if set(a) <= {"parent"}:  # a plain second name (transformed aliases draw something else)
            alias_names.setdefault(a["parent"], []).append(alias)
    cats: dict[str, list[str]] = {}
    for cat, names in meta.get("categories", {}).items():
        for n in names:
            cats.setdefault(n, []).append(cat)
    icons = []
    for name, ic in data["icons"].items():
        if ic.get("hidden"):
            continue
        concept, style = _style_of(name, rules)
        box = (ic.get("left", 0), ic.get("top", 0), ic.get("width", w0), ic.get("height", h0))
        tags = [_style_of(a, rules)[0].replace("-", " ") for a in alias_names.get(name, [])]
        icons.append(Icon(prefix, f"{prefix}-{style}", name, concept, ic["body"], box, tags=sorted(set(tags) - {concept}),
                          categories=cats.get(name, [])))
    return icons


_PH_ENUM = re.compile(r'\(\(i\) => \((.*?), i\)\)\((\w) \|\| \{\}\)', re.S)
_PH_ENTRY = re.compile(r'name:\s*"([^"]+)".*?figma_category:\s*(\w)\.(\w+),\s*tags:\s*\[(.*?)\]', re.S)


def read_phosphor_catalog(tgz: Path) -> dict[str, tuple[str, list[str]]]:
    """Phosphor's catalogue (dist/index.mjs): icon name -> (figma category, tags)."""
    text = read_member(tgz, "package/dist/index.mjs").decode("utf-8")
    enums: dict[str, dict[str, str]] = {}
    for body, var in _PH_ENUM.findall(text):
        enums[var] = dict(re.findall(r'i\.(\w+) = "([^"]+)"', body))
    out = {}
    for name, var, key, tags in _PH_ENTRY.findall(text):
        words = [t for t in re.findall(r'"([^"]+)"', tags) if not t.startswith("*")]
        out[name] = (enums.get(var, {}).get(key, ""), words)
    if not out:
        raise SourceError(f"{tgz.name}: no icons found in its catalogue (format changed?)")
    return out


def load_icons(cache: Path, sources: list[str] | None = None) -> list[Icon]:
    """All icons of the chosen sets (default: all of SETS), with the vendors' tags and categories."""
    sources = list(SETS) if sources is None else sources
    unknown = [s for s in sources if s not in SETS]
    if unknown:
        raise SourceError(f"unknown icon sets {unknown}; known: {', '.join(SETS)}")
    specs = [SETS[s][0] for s in sources] + ([PHOSPHOR_CATALOG] if "ph" in sources else [])
    tgz = fetch(specs, cache)
    icons: list[Icon] = []
    for s in sources:
        icons.extend(read_iconify(s, tgz[SETS[s][0]]))
    if "ph" in sources:
        catalog = read_phosphor_catalog(tgz[PHOSPHOR_CATALOG])
        for ic in icons:
            if ic.source == "ph" and ic.concept in catalog:
                ic.category, extra = catalog[ic.concept]
                ic.tags = sorted(set(ic.tags) | set(extra))
    return icons
