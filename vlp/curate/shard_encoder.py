"""One shard to one table: the model `vlp data embed` encodes with, and the shard's rows (keys, captions, sizes,
hashes, image and text embeddings, cosine). Both engines call it: the single-process embed in `vlp.curate.embed`
and each actor of the Ray engine (`vlp.curate.ray_embed`), so their tables are the same.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from vlp.curate.store import CurateError


def load_model(checkpoint: Optional[str], model: Optional[str], tokenizer: Optional[str], device):
    """A vlp checkpoint or export (knows its model), an open_clip file with --model, or --model's random weights."""
    from vlp.models import create_model, load_checkpoint

    if checkpoint:
        bundle = load_checkpoint(checkpoint, model_name=model, tokenizer=tokenizer, device=device)
    elif model:   # random weights, seeded: every rank and every resumed run embeds with the same model
        import torch

        torch.manual_seed(0)
        bundle = create_model(model, tokenizer=tokenizer, device=device)
    else:
        raise CurateError("give --checkpoint (a vlp checkpoint or export, or an open_clip file with --model) "
                          "or --model (random weights, seed 0)")
    bundle.model.eval()
    return bundle


def _sample_row(s) -> tuple:
    """(image bytes or None, caption or None, width, height) of one shard sample; header-only image check."""
    from vlp.data.errors import SkipSample
    from vlp.data.images import open_image

    img, cap, w, h = s.image, None, 0, 0
    try:
        cap = " ".join(s.caption().split()) or None
    except SkipSample:
        cap = None
    if img is not None:
        try:
            w, h = open_image(img).size
        except SkipSample:
            img = None
    return img, cap, w, h


def _encode_images(bundle, images: list[bytes], keys: list[str], batch_size: int, device, amp: bool):
    """Image features of the decodable images; -> (features [M, D], indices into `images` that decoded)."""
    from vlp.eval.datasets import EvalError, Sample
    from vlp.eval.encode import encode_images

    idx = list(range(len(images)))
    for attempt in (0, 1):
        samples = [Sample(key=keys[i], target=0, data=images[i], where="") for i in idx]
        try:
            return encode_images(bundle.model, bundle.preprocess_val, samples, device=device,
                                 batch_size=batch_size, amp=amp).numpy(), idx
        except EvalError:
            if attempt:
                raise
            from vlp.data.images import decode_rgb

            def decodes(i):
                try:
                    decode_rgb(images[i])
                    return True
                except Exception:  # noqa: BLE001 - a corrupt body behind a readable header
                    return False

            idx = [i for i in idx if decodes(i)]
    raise AssertionError("unreachable")


def embed_shard(bundle, url: str, batch_size: int = 256, device="cpu", amp: bool = False,
                retries: int = 2) -> dict:
    """The table (`vlp.curate.store`) of one shard."""
    from vlp.data.tario import TarError, read_shard
    from vlp.eval.encode import encode_texts

    rows, keys = [], []
    try:
        for s in read_shard(url, retries=retries):
            keys.append(s.key)
            rows.append(_sample_row(s))
    except TarError as e:
        raise CurateError(str(e).splitlines()[0]) from None
    if not any(r[0] is not None for r in rows):
        raise CurateError(f"{url}: none of its {len(rows)} samples holds a readable image "
                          f"(embed needs image+caption shards)")
    ok = [i for i, r in enumerate(rows) if r[0] is not None and r[1] is not None]
    img, got = _encode_images(bundle, [rows[i][0] for i in ok], [keys[i] for i in ok], batch_size, device, amp)
    ok = [ok[j] for j in got]
    txt = encode_texts(bundle.model, bundle.tokenizer, [rows[i][1] for i in ok], device=device,
                       batch_size=batch_size, amp=amp).numpy() if ok else np.zeros((0, img.shape[1]))
    n, d = len(rows), img.shape[1]
    out = {"key": np.array(keys, dtype=str), "caption": np.array([r[1] or "" for r in rows], dtype=str),
           "width": np.array([r[2] for r in rows], dtype=np.int32),
           "height": np.array([r[3] for r in rows], dtype=np.int32),
           "image_hash": np.array([hashlib.blake2b(r[0], digest_size=16).hexdigest() if r[0] else "" for r in rows],
                                  dtype=str),
           "valid": np.zeros(n, dtype=bool), "image": np.zeros((n, d), np.float16),
           "text": np.zeros((n, d), np.float16), "score": np.full(n, np.nan, np.float32)}
    out["valid"][ok] = True
    out["image"][ok] = img.astype(np.float16)
    out["text"][ok] = txt.astype(np.float16)
    out["score"][ok] = (img * txt).sum(1).astype(np.float32)
    return out
