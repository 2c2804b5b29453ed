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


def test_reused_batch_buffers_never_overwrite_what_the_consumer_holds(tmp_path):
    from open_clip.transform import image_transform

    n = 24
    write_shards(tmp_path / "sh", n, 6, bad={i: {"jpg": _textured_jpeg(i % 8)} for i in range(n)})
    loader = build_train_loader(cfg(str(tmp_path / "sh" / "{00000..00003}.tar"), batch_size=4, workers=2),
                                image_transform(32, is_train=True), IdTokenizer())
    held = [(b, b.clone(), b[1:3]) for b, _ in loader]          # every batch, and a view, kept alive
    assert len(held) == n // 4 and len({b.data_ptr() for b, _, _ in held}) == len(held)
    for b, copy, view in held:
        assert torch.equal(b, copy) and torch.equal(view, copy[1:3])
    del b, view
    only_views = [v for _, _, v in held]                        # a view alone still pins its buffer
    copies = [c for _, c, _ in held]
    held = None
    ptrs = []
    loader.set_epoch(1)
    for b, _ in loader:                                         # a consumer that lets go: buffers are reused
        ptrs.append(b.data_ptr())
    assert len(set(ptrs)) <= 3 < len(ptrs)
    for v, c in zip(only_views, copies):
        assert torch.equal(v, c[1:3])


def test_buffer_pool_reuses_only_free_buffers():
    from vlp.data.buffers import BufferPool

    pool = BufferPool(size=2)
    a = pool.take((4, 3))
    a_ptr = a.data_ptr()
    b = pool.take((4, 3))
    assert b.data_ptr() != a_ptr
    v = a[1:]
    del a
    c = pool.take((4, 3))                  # a's view holds it, b is held: a new buffer replaces a in the pool
    assert c.data_ptr() not in (a_ptr, b.data_ptr())
    del v
    pool.take((4, 3))                      # b and c held: a new one again (a has left the pool)
    c_ptr = c.data_ptr()
    del c
    assert pool.take((4, 3)).data_ptr() == c_ptr
    assert pool.take((5, 3)).shape == (5, 3)                         # another shape: a new pool


def test_normalize_is_the_reference_arithmetic():
    from vlp.data.transforms import FastTransform

    ft = FastTransform(16)
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    n = ft.normalizer
    assert torch.equal(ft.normalize(x), x.float().sub(n.mean_255).mul(n.inv_std_255))
