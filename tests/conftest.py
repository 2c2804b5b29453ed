"""Shared fixtures: tiny model configs and demo data built on the fly (nothing is downloaded)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


@pytest.fixture(scope="session")
def micro_model_json(tmp_path_factory) -> str:
    """Path to a JSON config of a very small CLIP (32 px, 32-d), registered by file stem `vlp-micro`."""
    path = tmp_path_factory.mktemp("cfg") / "vlp-micro.json"
    path.write_text(json.dumps(MICRO_CFG))
    return str(path)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """Small demo shards + eval sets (32 px images), written once per test session."""
    from data_tools.make_demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    return make_demo_data(out, train_samples=600, eval_samples=80, image_size=32, per_shard=150, progress=False)


def write_color_splits(base: Path, test: int, train: int) -> Path:
    """A CLIP_benchmark wds root of the demo colours with `test` and `train` splits (32 px), for probe tests."""
    import shutil

    from data_tools.make_demo_data import write_classification

    write_classification(base / "colors", "color", test, 32, seed=1, per_shard=test // 2)
    write_classification(base / "tmp", "color", train, 32, seed=2, per_shard=train // 2)
    shutil.move(str(base / "tmp" / "test"), str(base / "colors" / "train"))
    return base / "colors"


def write_tiny_bert(base: Path, layers: int = 1) -> Path:
    """A Hugging Face text tower folder `base/tiny-bert` (BERT, 32-d, `layers` layers, random weights, its own small
    WordPiece vocabulary), for the HF-tower tests; nothing is downloaded."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "a photo of red blue green circle square small large the on left right".split()
    vocab = base / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    hf_dir = base / "tiny-bert"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(hf_dir)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(hf_dir)
    return hf_dir


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # The same two harmless warnings vlp.data.transforms silences for users (pytest resets filters):
    # torchvision 0.29 deprecating its JPEG decoder, and decode_jpeg reading a read-only bytes buffer.
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:The given buffer is not writable:UserWarning")
