"""Errors of the data layer.

`DataError` is a problem the user must fix (bad spec, missing files, too many unreadable samples);
its message is one line. `SkipSample` is internal: one sample cannot be used, for a named reason.
"""
from __future__ import annotations

from vlp.config import ConfigError


class DataError(ConfigError):
    """Bad training data or data options; the message is one line for the user."""


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the key it is counted under in `skip_counts()`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# Skip reasons (the keys of TrainLoader.skip_counts()).
NOT_IMAGE = "not_image"                 # image member whose bytes are no known image format
CORRUPT_IMAGE = "corrupt_image"         # recognised format that fails to decode (truncated/corrupt JPEG...)
MISSING_IMAGE = "missing_image"         # sample without jpg/jpeg/png/webp member
MISSING_CAPTION = "missing_caption"     # sample without txt (and no json caption)
EMPTY_CAPTION = "empty_caption"         # caption that is empty or only whitespace
BAD_CAPTION_ENCODING = "bad_caption_encoding"  # caption bytes that are not UTF-8
TRUNCATED_TAR = "truncated_tar"         # samples lost because a tar ends early (counted per lost sample)
BAD_TAR = "bad_tar"                     # samples lost because a tar holds a corrupt header / is no tar
MISSING_SHARD = "missing_shard"         # samples lost because a shard file does not exist / cannot be opened
UNREADABLE_SHARD = "unreadable_shard"   # samples lost because a stream kept failing (dropped connection...) after retries
SIZE_MISMATCH = "size_mismatch"         # |size file's count - samples the shard holds|: phantom or hidden samples
IMAGE_TOO_LARGE = "image_too_large"     # more pixels than PIL's MAX_IMAGE_PIXELS by its header: refused undecoded

REASONS = (NOT_IMAGE, CORRUPT_IMAGE, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, BAD_CAPTION_ENCODING,
           TRUNCATED_TAR, BAD_TAR, MISSING_SHARD, UNREADABLE_SHARD, SIZE_MISMATCH, IMAGE_TOO_LARGE)

# TarError kinds (vlp.data.tario) -> the reason their lost samples are counted under
TAR_REASONS = {"missing": MISSING_SHARD, "truncated": TRUNCATED_TAR, "bad_header": BAD_TAR,
               "unreadable": UNREADABLE_SHARD}


class Absent(OSError):
    """A location that says it holds nothing (HTTP 404, no such object, a pipe that failed before writing)."""


class Stalled(OSError):
    """A transport that sent nothing for `--shard-timeout` seconds."""
