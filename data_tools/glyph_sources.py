"""Fonts of many families from the npm registry's Fontsource packages, and the characters drawn in them
(for make_glyph_bench).

Every family comes as `@fontsource/<id>`: its `files/` hold one font file per unicode subset, weight and
style (`files/roboto-greek-400-normal.woff`). A *face* is one family in one variant (regular, bold, italic)
and reads the subsets latin, latin-ext, greek and cyrillic where the family ships them. A character is drawn
by a face only where a subset's cmap maps it (fontTools) and its glyph has ink, so no missing-glyph boxes
(tofu) are rendered. Packages are fetched once with `npm pack` (pinned) into a cache folder and read from
the tarballs (data_tools.npm_cache); nothing is unpacked.
"""
from __future__ import annotations

import io
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.npm_cache import SourceError, fetch, read_members

VERSION = "5.3.0"
# family id -> genre; every package is @fontsource/<id>@VERSION unless PINS says otherwise
FAMILIES: dict[str, str] = {
    "pt-serif": "serif", "eb-garamond": "serif", "lora": "serif", "playfair-display": "serif",
    "old-standard-tt": "serif", "cormorant-garamond": "serif", "alegreya": "serif",
    "roboto": "sans", "fira-sans": "sans", "ubuntu": "sans", "montserrat": "sans", "comfortaa": "sans",
    "roboto-slab": "slab", "bitter": "slab", "kelly-slab": "slab",
    "roboto-mono": "mono", "jetbrains-mono": "mono", "ibm-plex-mono": "mono", "source-code-pro": "mono",
    "pt-mono": "mono",
    "caveat": "handwriting", "marck-script": "script", "bad-script": "script", "pacifico": "script",
    "lobster": "script", "great-vibes": "script", "neucha": "handwriting",
    "press-start-2p": "display", "russo-one": "display", "yeseva-one": "display", "poiret-one": "display",
    "oswald": "condensed", "roboto-condensed": "condensed", "yanone-kaffeesatz": "condensed",
    "pt-sans-narrow": "condensed",
}
PINS = {"source-code-pro": "5.3.1"}
VARIANTS = ("400-normal", "700-normal", "400-italic")
SUBSETS = ("latin", "latin-ext", "greek", "cyrillic")
# code point ranges of the candidate characters: ASCII, Latin-1, Latin Extended-A, Greek, Cyrillic
RANGES = ((0x21, 0x7E), (0xA1, 0xFF), (0x100, 0x17F), (0x386, 0x3CE), (0x400, 0x45F))
SCRIPTS = ("latin", "greek", "cyrillic")
_LETTER = re.compile(r"^(latin|greek|cyrillic) (small|capital) (letter|ligature) (.+)$")


def spec(family: str) -> str:
    return f"@fontsource/{family}@{PINS.get(family, VERSION)}"


def name(ch: str) -> str:
    """The caption of a character: its Unicode name in lower case ('latin small letter a with acute')."""
    return unicodedata.name(ch).lower()


def category(ch: str) -> str:
    """Script or class: 'latin letter', 'greek letter', 'cyrillic letter', 'digit', 'punctuation mark', 'symbol'."""
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return f"{name(ch).split()[0]} letter"
    return {"N": "digit", "P": "punctuation mark", "S": "symbol"}[cat[0]]


def characters() -> list[str]:
    """The candidate characters: letters of the three scripts, digits, punctuation and symbols."""
    out = []
    for lo, hi in RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            cat = unicodedata.category(ch)
            if not unicodedata.name(ch, "") or cat not in ("Lu", "Ll", "Lo", "Nd") and cat[0] not in "PS":
                continue
            if cat[0] == "L" and name(ch).split()[0] not in SCRIPTS:   # ª º µ: not a letter of a script
                continue
            out.append(ch)
    return out


def rewrites_of(ch: str) -> list[str]:
    """Other phrasings built from the name: 'the letter á', 'small a with acute', 'the latin letter ... in
    lower case', 'lowercase a with acute' (digits: 'the digit 7', 'the number seven'; others: 'the sign &')."""
    n = name(ch)
    m = _LETTER.match(n)
    if m:
        script, case, kind, rest = m.groups()
        low = case == "small"
        return [f"the {kind} {ch}", f"{case} {rest}", f"the {script} {kind} {rest} in {'lower' if low else 'upper'} case",
                f"{'lowercase' if low else 'uppercase'} {rest}"]
    if unicodedata.category(ch) == "Nd":
        word = n.split()[-1]
        return [f"the digit {ch}", f"the number {word}", word]
    return [f"the sign {ch}", f"{n}, a {category(ch)}", f"the {category(ch)} {ch}"]


@dataclass
class Face:
    family: str                                    # Fontsource id, e.g. "roboto"
    genre: str                                     # serif, sans, slab, mono, script, ...
    variant: str                                   # "400-normal", "700-normal", "400-italic"
    files: list[tuple[bytes, frozenset]] = field(default_factory=list)   # (font file, code points it maps)
    _fonts: dict = field(default_factory=dict, repr=False)

    def file_of(self, ch: str) -> bytes | None:
        for data, cps in self.files:
            if ord(ch) in cps:
                return data
        return None

    def font(self, data: bytes, px: int):
        from PIL import ImageFont

        key = (id(data), px)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(io.BytesIO(data), px, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[key]

    def draws(self, ch: str) -> bool:
        """The face maps the character and its glyph has ink."""
        data = self.file_of(ch)
        if data is None:
            return False
        left, top, right, bottom = self.font(data, 64).getbbox(ch, anchor="ls")
        return right > left and bottom > top


def _cmap(data: bytes, what: str) -> frozenset:
    from fontTools.ttLib import TTFont

    try:
        return frozenset(TTFont(io.BytesIO(data), lazy=True).getBestCmap() or ())
    except Exception as e:  # fontTools raises many kinds on a damaged file
        raise SourceError(f"{what}: not a readable font ({type(e).__name__})") from None


def read_faces(family: str, tgz: Path) -> list[Face]:
    """The faces of one Fontsource package: one per VARIANT it ships, with the SUBSETS it ships."""
    pat = re.compile(rf"^package/files/{re.escape(family)}-({'|'.join(SUBSETS)})-(\d+-(?:normal|italic))\.woff$")
    members = read_members(tgz, lambda n: bool(pat.match(n)))
    faces = []
    for variant in VARIANTS:
        files = [(data, _cmap(data, f"{tgz.name}:{m}")) for sub in SUBSETS for m, data in members.items()
                 if pat.match(m).groups() == (sub, variant)]
        if files:
            faces.append(Face(family, FAMILIES.get(family, "?"), variant, files))
    if not faces:
        raise SourceError(f"{tgz.name}: no files/{family}-<subset>-<variant>.woff for {', '.join(VARIANTS)}")
    return faces


def load_faces(cache: Path, families: list[str] | None = None) -> list[Face]:
    """All faces of the chosen families (default: all of FAMILIES)."""
    families = list(FAMILIES) if families is None else families
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SourceError(f"unknown font families {unknown}; known: {', '.join(FAMILIES)}")
    tgz = fetch([spec(f) for f in families], cache)
    return [face for f in families for face in read_faces(f, tgz[spec(f)])]


def render_png(face: Face, ch: str, size: int, margin: float = 0.12) -> bytes:
    """The character black on white in a `size` px square: cap height and baseline fixed per face (so case and
    position show), centred across; shrunk to fit only where a glyph would leave the square."""
    from PIL import Image, ImageDraw

    data = face.file_of(ch)
    if data is None:
        raise SourceError(f"{face.family} {face.variant} has no glyph for {name(ch)}")
    box = size * (1 - 2 * margin)
    ref = face.font(face.file_of("H") or data, 100)
    cap = -ref.getbbox("H" if face.file_of("H") else ch, anchor="ls")[1] or 70
    px = max(4, round(100 * box / (1.7 * cap)))          # accents above capitals (0.35) and descenders (0.35)
    font = face.font(data, px)
    left, top, right, bottom = font.getbbox(ch, anchor="ls")
    base = size * margin + 1.35 * box / 1.7
    if right - left > size - 2 or base + top < 0 or base + bottom > size:     # a swash or wide glyph: fit it
        px = max(4, int(px * min(size * (1 - margin) / max(right - left, bottom - top), 1)))
        font = face.font(data, px)
        left, top, right, bottom = font.getbbox(ch, anchor="ls")
        base = (size - (bottom - top)) / 2 - top
    im = Image.new("L", (size, size), 255)
    ImageDraw.Draw(im).text(((size - (right - left)) / 2 - left, base), ch, font=font, fill=0, anchor="ls")
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
