"""The fast decode path delivers what open_clip's own transform would: same geometry, same normalisation,
through worker processes (uint8 in shared memory, normalised on the receiving side)."""
import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from tests.test_data_fixtures import IdTokenizer, cfg, write_shards
from vlp.data.pipeline import build_train_loader


def _textured_jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = np.clip(np.linspace(0, 255, 96)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
                  + rng.normal(0, 8, (72, 96, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    ImageDraw.Draw(im).ellipse([20 + i, 10, 60 + i, 50], fill=(200, 30 + 10 * i, 40))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_fast_path_matches_open_clip_val_transform(tmp_path):
    from open_clip.transform import image_transform

    n = 8
    images = {i: _textured_jpeg(i) for i in range(n)}
    write_shards(tmp_path / "sh", n, 4, bad={i: {"jpg": b} for i, b in images.items()})
    preprocess = image_transform(32, is_train=False)
    loader = build_train_loader(cfg(str(tmp_path / "sh" / "{00000..00001}.tar"), batch_size=4, workers=1),
                                preprocess, IdTokenizer())
    seen = 0
    for batch, texts in loader:
        assert batch.dtype == torch.float32 and batch.shape[1:] == (3, 32, 32)
        for x, t in zip(batch, texts):
            ref = preprocess(Image.open(io.BytesIO(images[int(t[0])])).convert("RGB"))
            # PIL's and torch's bicubic resamplers differ by a few grey levels, not by a normalisation
            assert (x - ref).abs().mean() < 0.05, int(t[0])
            seen += 1
    assert seen == n
