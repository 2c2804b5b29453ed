"""A contact sheet: sample thumbnails in a grid, each with its caption underneath (a first look at a data set)."""
from __future__ import annotations

import textwrap
from pathlib import Path


def contact_sheet(samples: list[dict], path: str, thumb: int = 160, columns: int = 6, caption_lines: int = 3) -> Path:
    """`samples`: dicts with "image" (encoded bytes or None), "key" and "caption"; writes a PNG to `path`."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    from vlp.data.images import decode_rgb

    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, thumb // 6)
    cell_h = thumb + 4 + line_h * (caption_lines + 1)
    rows = max(1, -(-len(samples) // columns))
    sheet = Image.new("RGB", (columns * (thumb + 8), rows * (cell_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x, y = (i % columns) * (thumb + 8) + 4, (i // columns) * (cell_h + 8) + 4
        try:
            im = decode_rgb(s["image"])   # as the loader sees it: upright, 8-bit, transparency on white
            im = ImageOps.contain(im, (thumb, thumb), Image.NEAREST if max(im.size) < thumb // 2 else Image.BICUBIC)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except Exception:  # noqa: BLE001 - an unreadable image is shown as a grey box
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200))
        lines = [str(s.get("key", ""))[:chars]] + textwrap.wrap(s.get("caption") or "(no caption)", chars)[:caption_lines]
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + 4 + j * line_h), line, fill=(90, 90, 90) if j == 0 else "black", font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
