"""Samples the loader trains on but changes, each counted: a caption cut before tokenizing, an image far from
the crop's aspect ratio.

* A caption longer than `MAX_CAPTION_CHARS` is cut to that many characters before it is tokenized: a
  77-token context holds a few hundred characters of text, and open_clip's tokenizer spent 7.4 s on a 1 MB
  caption (a loader worker stalled for it) to keep the same 77 tokens.
* An image whose sides differ by more than `EXTREME_RATIO` times is trained on, not skipped: the crop keeps
  RandomResizedCrop's 3:4-4:3 ratio, so a 20000x2 image yields a 3x2-pixel crop near its middle, upscaled.

Each is a note (key, line) sent with a batch (vlp.data.worker); the loader prints the first of each kind and
counts them all (`TrainLoader.noted_counts`), which the console reports at each epoch end.
"""
from __future__ import annotations

from typing import Optional

MAX_CAPTION_CHARS = 16384
EXTREME_RATIO = 10
COUNTED = "counted:"     # note keys of this form are counted by kind: "counted:KIND:SAMPLE"
CAPTION_CUT, EXTREME_ASPECT = "caption_cut", "extreme_aspect"


def cut_caption(text: str, key: str) -> tuple[str, Optional[tuple[str, str]]]:
    """The caption, cut to `MAX_CAPTION_CHARS`, and the note of the cut (None when it fits)."""
    if len(text) <= MAX_CAPTION_CHARS:
        return text, None
    return text[:MAX_CAPTION_CHARS], (f"{COUNTED}{CAPTION_CUT}:{key}",
                                      f"note: sample {key}: its {len(text):,}-character caption is cut to the first "
                                      f"{MAX_CAPTION_CHARS:,} before tokenizing (further cuts are counted at each "
                                      f"epoch end)")


def aspect_note(size: Optional[tuple[int, int]], key: str) -> Optional[tuple[str, str]]:
    """The note of an image whose sides differ more than `EXTREME_RATIO` times (None otherwise)."""
    if not size or max(size) <= EXTREME_RATIO * max(1, min(size)):
        return None
    w, h = size
    return (f"{COUNTED}{EXTREME_ASPECT}:{key}",
            f"note: sample {key} is {w}x{h} pixels: trained on a crop near its middle that keeps at most a 4:3 "
            f"ratio ({min(w, h)} pixels on its short side), upscaled (further such images are counted at each "
            f"epoch end)")


def counted_kind(note_key: str) -> Optional[str]:
    """KIND of a counted note's key; None for other notes."""
    return note_key[len(COUNTED):].split(":", 1)[0] if note_key.startswith(COUNTED) else None
