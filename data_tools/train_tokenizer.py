"""Train a small sentencepiece tokenizer on shard captions and write a matching open_clip model config.

    vlp data train-tokenizer --train-data 'demo_data/train/{00000..00019}.tar' \\
        --vocab-size 2000 --out tok/demo --base-config vlp/model_configs/vlp-tiny.json

writes `tok/demo.model` (+ `.vocab`) and `tok/demo.json`, an open_clip model config copied from the
base config with `text_cfg` set to this vocabulary (`vocab_size`, `eos_id`, `pad_id`, `pool_type: eos`),
so that `--model tok/demo.json --tokenizer spm:tok/demo.model` works with vlp's trainer and
`vlp.models.create_model`. Captions come from each sample's `.txt` and, unless `--no-rewrites`, from
the `rewrites` list in its `.json`. Text is case-folded by the model itself (nmt_nfkc_cf).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

from vlp.flags import Parser
from vlp.progress import progress_bar
from vlp.rewrite.sources import InputError, open_input


PAD, UNK, BOS, EOS = 0, 1, 2, 3


def caption_stream(inputs: list[str], use_rewrites: bool = True, max_sentences: Optional[int] = None,
                   progress: bool = True, counter: Optional[dict] = None) -> Iterator[str]:
    """Captions (and rewrites) from shard specs / CSV / text files, in order, non-empty only."""
    n = 0
    for spec in inputs:
        _, records, total = open_input(spec)
        for rec in progress_bar(records, desc=f"reading {Path(spec.split('::')[0]).name}", total=total,
                        disable=not progress, unit="sample", leave=False):
            for text in [rec.caption] + (rec.rewrites if use_rewrites else []):
                if text:
                    yield text
                    n += 1
                    if counter is not None:
                        counter["sentences"] = n
                    if max_sentences and n >= max_sentences:
                        return


def train_sentencepiece(sentences: Iterable[str], prefix: str, vocab_size: int = 2000, model_type: str = "unigram",
                        character_coverage: float = 1.0) -> Path:
    """Train `prefix.model` with pad=0, unk=1, bos=2, eos=3; the vocabulary may come out smaller when the
    text is too small for `vocab_size` (hard_vocab_limit=False)."""
    import sentencepiece as spm

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        normalization_rule_name="nmt_nfkc_cf", hard_vocab_limit=False, minloglevel=2,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=2)
    return Path(prefix + ".model")


def model_config_for(base_config: str, model_file: str, context_length: Optional[int] = None) -> dict:
    """The base open_clip config with its text tower fitted to this sentencepiece model."""
    from vlp.tokenizers import SentencePieceTokenizer

    cfg = json.loads(Path(base_config).read_text())
    if "text_cfg" not in cfg:
        raise InputError(f"{base_config}: not an open_clip model config (no text_cfg)")
    tok = SentencePieceTokenizer(model_file)
    text = dict(cfg["text_cfg"])
    if "hf_model_name" in text or "hf_tokenizer_name" in text:
        raise InputError(f"{base_config}: its text tower is a Hugging Face model; a sentencepiece vocabulary needs "
                         "open_clip's own text transformer")
    text.update(tok.text_cfg_overrides())
    if context_length:
        text["context_length"] = context_length
    cfg["text_cfg"] = text
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--train-data", action="append", required=True,
                   help="shard spec (brace-expanded, sources joined by '::'), a relpath,caption CSV, or a text "
                        "file with one caption per line; may be repeated")
    p.add_argument("--output", "--out", dest="out", required=True, help="output prefix: writes OUT.model, OUT.vocab and OUT.json")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--no-rewrites", action="store_true", help="ignore the 'rewrites' list in each sample's .json")
    p.add_argument("--max-sentences", type=int, default=None, help="stop reading after this many sentences")
    p.add_argument("--base-config", default=None,
                   help="open_clip model config JSON to derive OUT.json from (e.g. vlp/model_configs/vlp-tiny.json)")
    p.add_argument("--context-length", type=int, default=None, help="override text_cfg.context_length in OUT.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.vocab_size < 8:
            raise InputError("--vocab-size must be at least 8")
        if a.base_config and not Path(a.base_config).is_file():
            raise InputError(f"base config not found: {a.base_config}")
        counter = {"sentences": 0}
        sentences = caption_stream(a.train_data, not a.no_rewrites, a.max_sentences, not a.no_progress, counter)
        try:
            model = train_sentencepiece(sentences, a.out, a.vocab_size, a.model_type, a.character_coverage)
        except RuntimeError as e:
            if counter["sentences"] == 0:
                raise InputError("no captions found in --train-data") from None
            raise InputError(f"sentencepiece training failed: {str(e).splitlines()[0][:200]}") from None
        from vlp.tokenizers import SentencePieceTokenizer

        tok = SentencePieceTokenizer(model)
        print(f"wrote {model} ({tok.vocab_size} pieces from {counter['sentences']} sentences; "
              f"eos_id={tok.eos_id} pad_id={tok.pad_id})")
        if a.base_config:
            cfg = model_config_for(a.base_config, str(model), a.context_length)
            cfg_path = Path(a.out + ".json")
            cfg_path.write_text(json.dumps(cfg, indent=4) + "\n")
            print(f"wrote {cfg_path}: use --model {cfg_path} --tokenizer spm:{model}")
    except (InputError, OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
