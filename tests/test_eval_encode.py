"""Fast text encoding paths equal open_clip's encode_text: trimmed batches and shared template prefixes."""
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from vlp.eval.datasets import fill_templates
from vlp.eval.encode import _SharedPrefix, encode_texts
from vlp.eval.zeroshot import build_classifier
from vlp.models import create_model


def test_shared_prefix_encoding_equals_encode_text(micro_model_json):
    torch.manual_seed(0)
    bundle = create_model(micro_model_json)
    model = bundle.model.eval()
    classes, templates = IMAGENET_CLASSNAMES[:40], OPENAI_IMAGENET_TEMPLATES[:6]
    prompts, counts = fill_templates(classes, templates)
    groups = [list(range(j, len(prompts), counts[0])) for j in range(counts[0])]
    with torch.no_grad():
        ref = F.normalize(model.encode_text(bundle.tokenizer(prompts)), dim=-1)
    calls = []
    real_init = _SharedPrefix.__init__

    def counting_init(self, m, prefix):
        calls.append(prefix.shape[1])
        real_init(self, m, prefix)

    _SharedPrefix.__init__ = counting_init
    try:
        grouped = encode_texts(model, bundle.tokenizer, prompts, batch_size=16, groups=groups)
    finally:
        _SharedPrefix.__init__ = real_init
    assert len(calls) == len(templates) and min(calls) >= 3  # one prefix per template, really shared
    assert torch.allclose(grouped, ref, atol=2e-6)
    assert torch.allclose(encode_texts(model, bundle.tokenizer, prompts, batch_size=16), ref, atol=2e-6)
    # The classifier built this way is open_clip's template-ensemble classifier.
    w = build_classifier(model, bundle.tokenizer, classes, templates, batch_size=16)
    expected = F.normalize(ref.view(len(classes), len(templates), -1).mean(1), dim=-1)
    assert torch.allclose(w, expected, atol=2e-6)


def test_cpu_chunks_fit_the_cache_and_change_nothing(micro_model_json, monkeypatch):
    import vlp.eval.encode as E

    torch.manual_seed(0)
    bundle = create_model(micro_model_json)
    model = bundle.model.eval()
    prompts, counts = fill_templates(IMAGENET_CLASSNAMES[:60], OPENAI_IMAGENET_TEMPLATES[:3])
    groups = [list(range(j, len(prompts), counts[0])) for j in range(counts[0])]
    images = torch.randn(40, 3, 32, 32)
    with torch.no_grad():
        ref_txt = F.normalize(model.encode_text(bundle.tokenizer(prompts)), dim=-1)
        ref_img = F.normalize(model.encode_image(images), dim=-1)
    # A 16 KiB "L2": every call is cut down to the MIN_CHUNK_TOKENS floor.
    monkeypatch.setattr(E, "_l2_bytes", lambda: 16 * 2**10)
    tokens, width = E._image_tokens(model)
    rows = E.cpu_chunk_rows("cpu", tokens, width)
    assert rows == -(-E.MIN_CHUNK_TOKENS // tokens) < len(images) and E.cpu_chunk_rows("cuda", tokens, width) is None
    sizes = []
    real = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x: sizes.append(len(x)) or real(x))
    img = E._embed_tensor_batches(model, [(torch.arange(40), images)], 40, "cpu", False)
    assert max(sizes) == rows and sum(sizes) == 40
    assert torch.allclose(img, ref_img, atol=2e-6)

    pool = E._pool_index(model, bundle.tokenizer(prompts))
    order = torch.argsort(pool, stable=True)
    chunks = list(E._chunks(order, pool, 64, "cpu", E._text_width(model)))
    assert torch.equal(torch.cat(chunks), order) and len(chunks) > len(prompts) // 64 + 1
    for c in chunks:
        assert len(c) <= max(E.cpu_chunk_rows("cpu", int(pool[c].max()) + 1, E._text_width(model)), 1)
    txt = encode_texts(model, bundle.tokenizer, prompts, batch_size=64, groups=groups)
    assert torch.allclose(txt, ref_txt, atol=2e-6)
