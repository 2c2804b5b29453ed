"""Rewriters: a causal LM loaded from a local folder (LaCLIP's recipe), or rules (no model).

Both give, for a batch of captions with their global indices, one raw candidate per source
(pool or rule variant) and caption, plus the context the guards need. Every random choice is
seeded from (run seed, source, caption index), so results do not depend on batch boundaries
or on where an interrupted run resumed.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from vlp.rewrite.prompt import build_prompt, cut_generation, derive_seed


@dataclass
class Candidate:
    text: str
    used_pairs: list[tuple[str, str]] = field(default_factory=list)


class RuleRewriter:
    """Stopword removal and one EDA operation (vlp.data.text_aug), k differently seeded variants."""

    def __init__(self, num_rewrites: int = 4, seed: int = 0):
        if num_rewrites < 1:
            raise ValueError("--num-rewrites must be at least 1")
        self.sources = [f"rule{j + 1}" for j in range(num_rewrites)]
        self.seed = seed

    def describe(self) -> dict:
        return {"backend": "rules", "sources": self.sources, "seed": self.seed}

    def rewrite(self, captions: Sequence[str], indices: Sequence[int]) -> list[list[Candidate]]:
        from vlp.data.text_aug import augment

        out = []
        for cap, idx in zip(captions, indices):
            row = []
            for src in self.sources:
                rng = random.Random(derive_seed("rules", self.seed, src, idx))
                row.append(Candidate(augment(cap, "stopwords+eda", rng) if cap.strip() else cap))
            out.append(row)
        return out


def sample_top_p(logits, u, temperature: float, top_p: float):
    """One token per row from softmax(logits / T) restricted to the top-p nucleus, by inverse CDF with the
    row's own uniform number `u` (so a row's draw does not depend on the other rows). T <= 0: greedy."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sp, si = probs.sort(dim=-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p
    keep[:, 0] = True
    sp = sp * keep
    cum = sp.cumsum(-1)
    target = u.to(cum.device, cum.dtype).unsqueeze(-1) * cum[:, -1:]
    idx = (cum <= target).sum(-1).clamp(max=sp.shape[-1] - 1)
    return si.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


class LLMRewriter:
    """LaCLIP rewriting with any causal LM that transformers loads from a local folder (never the hub)."""

    def __init__(self, model_dir: str, pools: dict[str, list[tuple[str, str]]], *, seed: int = 0,
                 temperature: float = 0.9, top_p: float = 0.95, max_new_tokens: int = 77, n_examples: int = 3,
                 device: str = "auto", dtype: str = "auto", attn_implementation: Optional[str] = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        from vlp.compat import require_module

        require_module("transformers", "hf", "rewriting with an LLM (--model)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_dir).is_dir():
            raise ValueError(f"model folder not found: {model_dir}")
        if not pools:
            raise ValueError("no prompt pools")
        self.model_dir = str(model_dir)
        self.pools = pools
        self.sources = list(pools)
        self.seed, self.temperature, self.top_p = seed, temperature, top_p
        self.max_new_tokens, self.n_examples = max_new_tokens, n_examples
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            tdtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        else:
            tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            kwargs = {"dtype": tdtype, "local_files_only": True}
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot load a causal LM from {model_dir}: {str(e).strip().splitlines()[0][:200]}") from None
        self.model.to(self.device).eval()
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            if tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            elif tok.unk_token is not None:
                tok.pad_token = tok.unk_token
            else:
                raise ValueError(f"{model_dir}: the tokenizer has no pad, EOS or UNK token to pad with")
        self._stop = self._stop_ids()
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def describe(self) -> dict:
        return {"backend": "llm", "model": os.path.abspath(self.model_dir), "sources": self.sources,
                "pools": {k: [list(p) for p in v] for k, v in self.pools.items()}, "seed": self.seed,
                "temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "n_examples": self.n_examples}

    def _stop_ids(self):
        """Tokens that end a rewrite: any whose text holds a newline, and EOS."""
        import torch

        n = max(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0])
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        stop = torch.zeros(n, dtype=torch.bool)
        for i, t in enumerate(texts):
            if "\n" in t:
                stop[i] = True
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if e is not None and 0 <= e < n:
                stop[e] = True
        return stop.to(self.device)

    def rewrite(self, captions: Sequence[str], indices: Sequence[int]) -> list[list[Candidate]]:
        out: list[list[Candidate]] = [[] for _ in captions]
        for name, pairs in self.pools.items():
            prompts, used, seeds = [], [], []
            for cap, idx in zip(captions, indices):
                rng = random.Random(derive_seed("prompt", self.seed, name, idx))
                p, chosen = build_prompt(cap, pairs, rng, self.n_examples)
                prompts.append(p)
                used.append(chosen)
                seeds.append(derive_seed("sample", self.seed, name, idx))
            texts = self.generate(prompts, seeds)
            for row, (t, u) in enumerate(zip(texts, used)):
                out[row].append(Candidate(t, u))
        return out

    def generate(self, prompts: list[str], seeds: list[int]) -> list[str]:
        """Sample a continuation of each prompt (left-padded batch, KV cache), cut at the first newline."""
        import torch

        tok, model = self.tokenizer, self.model
        max_len = None
        if self.max_positions:
            max_len = max(8, self.max_positions - self.max_new_tokens)
        tok.truncation_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=max_len is not None, max_length=max_len)
        ids = enc["input_ids"].to(self.device)
        attn = enc["attention_mask"].to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        uniforms = torch.stack([torch.rand(self.max_new_tokens, generator=torch.Generator().manual_seed(s))
                                for s in seeds]).to(self.device)
        n = len(prompts)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        generated = torch.full((n, self.max_new_tokens), tok.pad_token_id, dtype=torch.long, device=self.device)
        steps = 0
        with torch.inference_mode():
            out = self._forward(ids, attn, pos, None)
            for t in range(self.max_new_tokens):
                logits = out.logits[:, -1, :]
                nxt = sample_top_p(logits, uniforms[:, t], self.temperature, self.top_p)
                nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
                generated[:, t] = nxt
                steps = t + 1
                done |= self._stop[nxt.clamp(max=self._stop.shape[0] - 1)]
                if bool(done.all()) or t + 1 == self.max_new_tokens:
                    break
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
                pos = pos[:, -1:] + 1
                out = self._forward(nxt.unsqueeze(-1), attn, pos, out.past_key_values)
        texts = tok.batch_decode(generated[:, :steps].tolist(), skip_special_tokens=True)
        return [cut_generation(t) for t in texts]

    def _forward(self, ids, attn, pos, past):
        kwargs = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        if past is not None:
            kwargs["past_key_values"] = past
        try:
            return self.model(**kwargs, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            return self.model(**kwargs)
