"""Checkpoints and exports that travel: open_clip loads step checkpoints and self-contained export folders
(open_clip, sentencepiece and Hugging Face tokenizers), a SigLIP bias round-trips, and the transformers
CLIPModel export gives the same embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from tests.conftest import MICRO_CFG, repo_root, write_tiny_bert
from vlp.config import parse_config
from vlp.models import create_model, export_open_clip, load_checkpoint
from vlp.train.loop import train

TEXTS = ["a small red circle on the left", "Two  BLUE squares, top right!", "x"]


def _train(demo_data, model_json, logs, name, *extra):
    cfg = parse_config(["--train-data", demo_data["train_data"], "--model", model_json, "--logs", str(logs),
                        "--name", name, "--batch-size", "16", "--workers", "1", "--warmup", "1", "--max-steps", "2",
                        "--report-to", "none", "--no-progress", *extra])
    train(cfg)
    return Path(logs) / name


def _same_embeddings(a, b, tok_a, tok_b, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x, normalize=True), b.encode_image(x, normalize=True))
        torch.testing.assert_close(a.encode_text(tok_a(TEXTS), normalize=True), b.encode_text(tok_b(TEXTS), normalize=True))


def test_step_checkpoint_loads_in_open_clip_and_siglip_bias_round_trips(demo_data, micro_model_json, tmp_path):
    run = _train(demo_data, micro_model_json, tmp_path, "sig", "--loss", "siglip")
    step = run / "checkpoints" / "step_00000002.pt"
    ours = load_checkpoint(str(step))
    # open_clip reads the `state_dict` key of a step checkpoint; a SigLIP one needs the architecture's bias: local-dir
    theirs, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(run / "export"))
    assert float(theirs.logit_bias) == float(ours.model.logit_bias) != -10.0   # trained, not the init
    _same_embeddings(ours.model, theirs, ours.tokenizer, open_clip.get_tokenizer("local-dir:" + str(run / "export")), 32)

    # --pretrained from the SigLIP checkpoint and from its export folder: bias and weights carried over
    for source, loss in ((str(step), "siglip"), (str(run / "export"), "clip")):
        cont = _train(demo_data, micro_model_json, tmp_path, f"cont-{loss}", "--pretrained", source, "--loss", loss,
                      "--lr", "1e-12", "--wd", "0")
        again = load_checkpoint(str(cont / "checkpoints" / "step_00000002.pt"))
        assert float(again.model.logit_bias) == float(ours.model.logit_bias)
        _same_embeddings(ours.model, again.model, ours.tokenizer, again.tokenizer, 32)
    # vlp reads the export's safetensors under the plain name (open_clip itself fails there: no bias in that config)
    named = load_checkpoint(str(run / "export" / "open_clip_model.safetensors"), model_name="vlp-micro")
    assert float(named.model.logit_bias) == float(ours.model.logit_bias)


def test_clip_step_checkpoint_is_an_open_clip_pretrained_file(demo_data, micro_model_json, tmp_path):
    run = _train(demo_data, micro_model_json, tmp_path, "clip")
    step = run / "checkpoints" / "step_00000002.pt"
    theirs, _, _ = open_clip.create_model_and_transforms("vlp-micro", pretrained=str(step))
    ours = load_checkpoint(str(step))
    _same_embeddings(ours.model, theirs, ours.tokenizer, open_clip.get_tokenizer("vlp-micro"), 32)
    size = step.stat().st_size
    assert size < 1.3 * sum(v.numel() * 4 for v in ours.model.state_dict().values()) * 3  # weights stored once (+ Adam)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from data_tools import train_tokenizer
    from data_tools.make_demo_data import write_train

    d = tmp_path_factory.mktemp("spm")
    write_train(d / "train", 60, 32, 30, seed=0, progress=False)
    assert train_tokenizer.main(["--train-data", str(d / "train" / "{00000..00001}.tar"), "--vocab-size", "120",
                                 "--out", str(d / "tok" / "demo-spm"), "--base-config",
                                 str(repo_root() / "vlp/model_configs/vlp-tiny.json"), "--no-progress"]) == 0
    return d / "tok"


@pytest.mark.parametrize("kind", ["spm", "hf"])
def test_export_with_own_tokenizer_is_self_contained(kind, spm_model, tmp_path):
    """The tokenizer files travel inside export/ (relative reference): open_clip's local-dir: model and
    tokenizer give vlp's tokens and embeddings after the source tokenizer is gone."""
    import shutil

    from vlp.tokenizers import spm_to_hf

    src = tmp_path / "src"
    shutil.copytree(spm_model, src)
    spec = f"spm:{src / 'demo-spm.model'}"
    if kind == "hf":
        spm_to_hf(src / "demo-spm.model").save_pretrained(str(src / "hf"))
        spec = f"hf:{src / 'hf'}"
    bundle = create_model(str(src / "demo-spm.json"), tokenizer=spec)
    out = export_open_clip(bundle.model, bundle.model_cfg, open_clip.get_model_preprocess_cfg(bundle.model),
                           tmp_path / "export", tokenizer=spec)
    ours = bundle.tokenizer(TEXTS)
    shutil.rmtree(src)
    assert str(tmp_path) not in (out / "open_clip_config.json").read_text()
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    assert torch.equal(tok(TEXTS), ours)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    _same_embeddings(bundle.model, model, bundle.tokenizer, tok, 64)
    assert torch.equal(load_checkpoint(str(out)).tokenizer(TEXTS), ours)   # vlp reads it back the same way


def test_export_with_hf_text_tower_is_self_contained(demo_data, tmp_path, monkeypatch):
    """An HF text tower's config travels in export/: with its source folder deleted and another working
    directory, open_clip's local-dir: model and tokenizer give the trained model's tokens and embeddings, and
    vlp's eval of the export (also after the export folder itself moved) gives the step checkpoint's figures."""
    import shutil

    import eval_zeroshot

    (tmp_path / "src").mkdir()
    src = write_tiny_bert(tmp_path / "src")
    model_json = tmp_path / "vlp-hf-micro.json"
    model_json.write_text(json.dumps({"embed_dim": 32, "vision_cfg": MICRO_CFG["vision_cfg"], "text_cfg": {
        "hf_model_name": str(src), "hf_tokenizer_name": str(src), "context_length": 16,
        "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}}))
    run = _train(demo_data, str(model_json), tmp_path / "logs", "hf")
    step = run / "checkpoints" / "step_00000002.pt"
    ours = load_checkpoint(str(step))
    colors = next(d for d in demo_data["eval_data"] if d.endswith("demo_colors"))

    def scores(checkpoint, name):
        assert eval_zeroshot.main(["--checkpoint", str(checkpoint), "--data", colors, "--quiet", "--workers", "0",
                                   "--output", str(tmp_path / "out" / name)]) == 0
        (res,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / name).glob("*.json")]
        return res["metrics"]

    reference = scores(step, "ref")
    shutil.rmtree(tmp_path / "src")
    monkeypatch.chdir(tmp_path / "logs")             # a relative tower path would now resolve elsewhere
    export = run / "export"
    text = (export / "open_clip_config.json").read_text()
    assert str(src) not in text and json.loads(text)["model_cfg"]["text_cfg"]["hf_model_pretrained"] is False
    tok = open_clip.get_tokenizer(f"local-dir:{export}")
    assert torch.equal(tok(TEXTS), ours.tokenizer(TEXTS))
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    _same_embeddings(ours.model, theirs, ours.tokenizer, tok, 32)
    assert scores(export, "export") == reference

    moved = tmp_path / "moved"
    shutil.move(str(export), str(moved))
    again = load_checkpoint(str(moved))
    _same_embeddings(ours.model, again.model, ours.tokenizer, again.tokenizer, 32)
    assert scores(moved, "moved") == reference


def test_hf_transformers_export_matches(micro_model_json, tmp_path):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from vlp import hf_export

    torch.manual_seed(0)
    bundle = create_model(micro_model_json)
    ckpt = tmp_path / "m.pt"
    torch.save({"state_dict": bundle.model.state_dict()}, ckpt)
    assert hf_export.main(["--checkpoint", str(ckpt), "--model", "vlp-micro", "--output", str(tmp_path / "hf")]) == 0
    hf = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    proc = CLIPProcessor.from_pretrained(str(tmp_path / "hf"))
    m = bundle.model.eval()
    x = torch.randn(3, 3, 32, 32)
    enc = proc(text=TEXTS, return_tensors="pt", padding="max_length", max_length=16, truncation=True)
    assert torch.equal(enc["input_ids"][:, :3], bundle.tokenizer(TEXTS)[:, :3])  # padding differs (EOT vs 0): pooled at the first EOT either way
    n = torch.nn.functional.normalize
    with torch.no_grad():
        torch.testing.assert_close(n(hf.get_image_features(pixel_values=x).pooler_output, dim=-1),
                                   m.encode_image(x, normalize=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(n(hf.get_text_features(**enc).pooler_output, dim=-1),
                                   m.encode_text(bundle.tokenizer(TEXTS), normalize=True), atol=1e-5, rtol=1e-5)
        assert float(hf.logit_scale) == pytest.approx(float(m.logit_scale))
    img = Image.new("RGB", (50, 40), (200, 30, 90))
    assert (proc(images=img, return_tensors="pt")["pixel_values"][0] - bundle.preprocess_val(img)).abs().max() < 0.05

    rn = tmp_path / "vlp-rn.json"
    rn.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                           "layers": 1}}))
    with pytest.raises(hf_export.ExportError, match="ViT only"):
        hf_export.export_hf_clip(create_model(str(rn)).model, {}, tmp_path / "rn")
