import json
import pickle
from pathlib import Path

import pytest
import torch

from data_tools import train_tokenizer
from data_tools.make_demo_data import write_train
from vlp.tokenizers import SentencePieceTokenizer, check_model_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    write_train(d / "train", 60, 32, 30, seed=0, progress=False)
    rc = train_tokenizer.main(["--train-data", str(d / "train" / "{00000..00001}.tar"), "--vocab-size", "120",
                               "--out", str(d / "tok" / "demo-spm"), "--base-config",
                               str(ROOT / "vlp/model_configs/vlp-tiny.json"), "--no-progress"])
    assert rc == 0
    return d / "tok"


def test_tokenizer_layout(spm_dir):
    tok = SentencePieceTokenizer(spm_dir / "demo-spm.model", context_length=12)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.vocab_size == tok.sp.get_piece_size()
    out = tok(["a small red circle", "blue"])
    assert out.shape == (2, 12) and out.dtype == torch.long
    for row in out:
        ids = row.tolist()
        assert ids[0] == tok.bos_id
        e = ids.index(tok.eos_id)
        assert all(i == tok.pad_id for i in ids[e + 1:])
        assert tok.pad_id not in ids[:e]
    assert tok.decode(out[0]) == "a small red circle"
    assert tok("blue").shape == (1, 12)


def test_truncation_keeps_eos(spm_dir):
    tok = SentencePieceTokenizer(spm_dir / "demo-spm.model", context_length=8)
    row = tok(["red " * 50])[0]
    assert row[-1].item() == tok.eos_id and (row == tok.eos_id).sum() == 1 and tok.pad_id not in row.tolist()


def test_pickle_roundtrip(spm_dir):
    tok = SentencePieceTokenizer(spm_dir / "demo-spm.model", context_length=10)
    tok2 = pickle.loads(pickle.dumps(tok))
    assert torch.equal(tok(["a blue square"]), tok2(["a blue square"]))


def test_model_config_written(spm_dir):
    cfg = json.loads((spm_dir / "demo-spm.json").read_text())
    base = json.loads((ROOT / "vlp/model_configs/vlp-tiny.json").read_text())
    tok = SentencePieceTokenizer(spm_dir / "demo-spm.model")
    assert cfg["vision_cfg"] == base["vision_cfg"]
    t = cfg["text_cfg"]
    assert (t["vocab_size"], t["eos_id"], t["pad_id"], t["pool_type"]) == (tok.vocab_size, 3, 0, "eos")
    assert t["context_length"] == base["text_cfg"]["context_length"]
    assert check_model_cfg(cfg, tok) is None
    assert "pool_type" in check_model_cfg(base, tok)


def test_create_model_pools_at_eos(spm_dir):
    from vlp.models import create_model

    torch.manual_seed(0)
    b = create_model(str(spm_dir / "demo-spm.json"), tokenizer=f"spm:{spm_dir / 'demo-spm.model'}")
    tok = b.tokenizer
    assert isinstance(tok, SentencePieceTokenizer) and tok.context_length == 32
    b.model.eval()
    texts = tok(["a small red circle above a blue square", "green triangle"])
    with torch.no_grad():
        f1 = b.model.encode_text(texts, normalize=True)
        # tokens after EOS (in the padding) must not change the pooled features ...
        noisy = texts.clone()
        for i in range(len(noisy)):
            e = (noisy[i] == tok.eos_id).nonzero()[0, 0].item()
            noisy[i, e + 1:] = torch.randint(4, tok.vocab_size, (noisy.shape[1] - e - 1,))
        f2 = b.model.encode_text(noisy, normalize=True)
        # ... while a token before EOS does
        changed = texts.clone()
        changed[0, 1] = 5 if changed[0, 1] != 5 else 6
        f3 = b.model.encode_text(changed, normalize=True)
        images = torch.randn(2, 3, 64, 64)
        out = b.model(images, texts)
    assert torch.allclose(f1, f2, atol=1e-5)
    assert not torch.allclose(f1[0], f3[0], atol=1e-4)
    assert out["text_features"].shape == (2, 128) and out["image_features"].shape == (2, 128)


def test_bad_input_one_line(tmp_path, capsys):
    rc = train_tokenizer.main(["--train-data", str(tmp_path / "missing.tar"), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("error:") and "\n" not in err
