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
