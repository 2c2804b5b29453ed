"""Model building and checkpoint interop: JSON configs, HF text towers from local folders, open_clip round trips."""
import json

import open_clip
import pytest
import torch

from tests.conftest import MICRO_CFG, write_tiny_bert
from vlp.config import ConfigError
from vlp.models import create_model, export_open_clip, load_checkpoint, model_identity


def test_hf_text_tower_from_local_folder_loads_its_weights(tmp_path):
    hf_dir = write_tiny_bert(tmp_path)
    cfg = {"embed_dim": 32, "vision_cfg": MICRO_CFG["vision_cfg"],
           "text_cfg": {"hf_model_name": str(hf_dir), "hf_tokenizer_name": str(hf_dir), "context_length": 16,
                        "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}}
    path = tmp_path / "vlp-hf-micro.json"
    path.write_text(json.dumps(cfg))
    bundle = create_model(str(path))
    from transformers import BertModel

    saved = BertModel.from_pretrained(hf_dir).state_dict()
    tower = bundle.model.text.transformer.state_dict()
    assert torch.equal(tower["embeddings.word_embeddings.weight"], saved["embeddings.word_embeddings.weight"])
    texts = bundle.tokenizer(["a red circle on the left", "a small blue square"])
    assert texts.shape == (2, 16)
    out = bundle.model(torch.randn(2, 3, 32, 32), texts)
    assert out["text_features"].shape == (2, 32)


def test_hf_tower_name_that_is_not_a_folder_is_refused(tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": MICRO_CFG["vision_cfg"],
           "text_cfg": {"hf_model_name": "bert-base-uncased", "hf_tokenizer_name": "bert-base-uncased"}}
    path = tmp_path / "vlp-hf-hub.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="local folder"):
        create_model(str(path))


def test_checkpoint_formats_round_trip(micro_model_json, tmp_path):
    torch.manual_seed(1)
    bundle = create_model(micro_model_json)
    bundle.model.eval()
    images, texts = torch.randn(3, 3, 32, 32), bundle.tokenizer(["a red circle", "a blue square", "green"])
    with torch.no_grad():
        ref = bundle.model(images, texts)["image_features"]

    # vlp checkpoint: knows its own architecture, even in a process where the JSON was never registered.
    vlp_ckpt = tmp_path / "step_00000001.pt"
    torch.save({"model": bundle.model.state_dict(), "step": 1, **model_identity(bundle, None)}, vlp_ckpt)
    from open_clip import factory

    factory._MODEL_CONFIGS.pop("vlp-micro", None)
    loaded = load_checkpoint(str(vlp_ckpt))
    with torch.no_grad():
        assert torch.allclose(loaded.model(images, texts)["image_features"], ref)

    # open_clip's own loader reads the exported folder, and a plain state-dict file with the model name.
    export = export_open_clip(bundle.model, bundle.model_cfg, open_clip.get_model_preprocess_cfg(bundle.model),
                              tmp_path / "export")
    oc_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    oc_model.eval()
    with torch.no_grad():
        assert torch.allclose(oc_model.encode_image(images, normalize=True), ref, atol=1e-6)
    oc_file = tmp_path / "open_clip.pt"
    torch.save({"state_dict": bundle.model.state_dict()}, oc_file)
    open_clip.add_model_config(micro_model_json)
    assert torch.allclose(load_checkpoint(str(oc_file), model_name="vlp-micro").model(images, texts)["image_features"],
                          ref, atol=1e-6)
    with pytest.raises(ConfigError, match="not a vlp checkpoint"):
        load_checkpoint(str(oc_file))


def test_checkpoint_of_another_architecture_is_one_clear_error(micro_model_json, tmp_path):
    bundle = create_model(micro_model_json)
    path = tmp_path / "other.pt"
    torch.save({"state_dict": bundle.model.state_dict()}, path)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(str(path), model_name="vlp-tiny")
    assert "does not fit this architecture" in str(err.value) and "\n" not in str(err.value)
