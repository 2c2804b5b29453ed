"""Tokenizers beyond open_clip's own: a sentencepiece model as a CLIP text tokenizer.

`SentencePieceTokenizer(model_file, context_length=77)` behaves like open_clip's tokenizers:
`tok(texts) -> LongTensor[N, context_length]`, rows `[BOS] pieces... EOS PAD PAD ...` (BOS only
when the model has one), padded with `pad_id` (the model's pad id, else 0), truncated so that
EOS is always kept as the last token.

open_clip's text tower pools at `text.argmax()` by default, which assumes the end token has the
highest id; for a sentencepiece vocabulary the model config needs
`"pool_type": "eos", "eos_id": tok.eos_id, "pad_id": tok.pad_id` (see `text_cfg_overrides`);
`data_tools/train_tokenizer.py` writes such a config.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch

_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


class SentencePieceTokenizer:
    """A sentencepiece model wrapped with open_clip's tokenizer interface."""

    def __init__(self, model_file: Union[str, Path], context_length: int = 77):
        import sentencepiece as spm

        self.model_file = str(model_file)
        if not Path(self.model_file).is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.model_file}")
        if context_length < 2:
            raise ValueError("context_length must be at least 2 (room for EOS)")
        self.context_length = int(context_length)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.vocab_size = int(self.sp.get_piece_size())
        eos = self.sp.eos_id()
        if eos < 0:
            raise ValueError(f"{self.model_file}: the sentencepiece model has no EOS piece (train it with eos_id >= 0)")
        self.eos_id = int(eos)
        self.bos_id = int(self.sp.bos_id())  # -1 when the model has none
        self.pad_id = int(self.sp.pad_id()) if self.sp.pad_id() >= 0 else 0
        if self.pad_id == self.eos_id:
            raise ValueError(f"{self.model_file}: pad and EOS share id {self.eos_id}; EOS pooling needs them apart")
        # open_clip names, for callers that look for them
        self.sot_token_id = self.bos_id if self.bos_id >= 0 else None
        self.eot_token_id = self.eos_id

    # pickling (data-loader workers started with spawn): reload from the model bytes
    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp"] = self.sp.serialized_model_proto()
        return state

    def __setstate__(self, state):
        import sentencepiece as spm

        proto = state.pop("sp")
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto)

    def encode(self, text: str) -> list[int]:
        """Piece ids of one text, without BOS/EOS."""
        return list(self.sp.encode(_clean(text), out_type=int))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = {self.pad_id, self.eos_id, self.bos_id}
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in special:
                out.append(int(i))
        return self.sp.decode(out)

    def __call__(self, texts: Union[str, list[str]], context_length: Optional[int] = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        prefix = [self.bos_id] if self.bos_id >= 0 else []
        room = ctx - len(prefix) - 1
        if room < 0:
            raise ValueError(f"context_length {ctx} leaves no room for BOS and EOS")
        result = torch.full((len(texts), ctx), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(self.sp.encode([_clean(t) for t in texts], out_type=int)):
            row = prefix + ids[:room] + [self.eos_id]
            result[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return result

    def text_cfg_overrides(self) -> dict:
        """What an open_clip `text_cfg` needs for this tokenizer."""
        return {"vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id, "pool_type": "eos"}

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer({self.model_file!r}, context_length={self.context_length}, "
                f"vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})")


def check_model_cfg(model_cfg: dict, tokenizer) -> Optional[str]:
    """A one-line problem when a model config does not fit a SentencePieceTokenizer, else None."""
    if not isinstance(tokenizer, SentencePieceTokenizer):
        return None
    text = model_cfg.get("text_cfg", {})
    problems = []
    if text.get("vocab_size", 49408) < tokenizer.vocab_size:
        problems.append(f"text_cfg.vocab_size {text.get('vocab_size', 49408)} < tokenizer's {tokenizer.vocab_size}")
    if text.get("pool_type", "argmax") != "eos" or text.get("eos_id", 2) != tokenizer.eos_id:
        problems.append(f"text_cfg needs pool_type 'eos' and eos_id {tokenizer.eos_id}")
    if text.get("pad_id", 0) != tokenizer.pad_id:
        problems.append(f"text_cfg.pad_id should be {tokenizer.pad_id}")
    return "; ".join(problems) or None


def spm_to_hf(model_file: Union[str, Path]):
    """The same tokenizer as `SentencePieceTokenizer(model_file)` as a transformers fast tokenizer (what
    open_clip's HFTokenizer loads from an export folder): spm's own normaliser and pieces, `[BOS] ... EOS`
    added after truncation (so EOS is always kept), padded with the pad piece."""
    from types import SimpleNamespace

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    tok = SentencePieceTokenizer(model_file)
    fast = SpmConverter(SimpleNamespace(vocab_file=str(model_file), legacy=False, add_prefix_space=True)).converted()
    piece = tok.sp.id_to_piece
    specials = [(piece(tok.eos_id), tok.eos_id)]
    template = f"$A {piece(tok.eos_id)}"
    if tok.bos_id >= 0:
        specials.append((piece(tok.bos_id), tok.bos_id))
        template = f"{piece(tok.bos_id)} {template}"
    fast.post_processor = TemplateProcessing(single=template, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=fast, eos_token=piece(tok.eos_id), pad_token=piece(tok.pad_id),
        bos_token=piece(tok.bos_id) if tok.bos_id >= 0 else None,
        unk_token=piece(tok.sp.unk_id()) if tok.sp.unk_id() >= 0 else None)


def save_tokenizer_files(spec: Optional[str], text_cfg: dict, out_dir: Path) -> dict:
    """Write the tokenizer of `--tokenizer spec` (or of an HF text tower's folder) into an export folder and
    return the text_cfg entries that make open_clip load it from there (`hf_tokenizer_name`: '.', the export
    folder itself under `local-dir:`). open_clip's own BPE tokenizer needs nothing: {}."""
    kind, _, arg = (spec or "").partition(":")
    if kind == "spm":
        import shutil

        spm_to_hf(arg).save_pretrained(str(out_dir))
        shutil.copy2(arg, out_dir / Path(arg).name)  # for vlp's --tokenizer spm:EXPORT/NAME.model too
        return {"hf_tokenizer_name": "."}
    source = arg if kind == "hf" else text_cfg.get("hf_tokenizer_name")
    if source and Path(source).is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(str(out_dir))
        return {"hf_tokenizer_name": "."}
    return {}
