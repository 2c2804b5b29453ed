"""Rewrite captions LaCLIP-style with a local causal LM (or with rules), resumably, into add_rewrites' formats.

    # with an LLM in a local folder (any transformers causal LM; nothing is downloaded)
    vlp data rewrite-captions --input 'demo_data/train/{00000..00019}.tar' \\
        --model /models/llama-7b --out rewrites/ --format jsonl
    # without a model: stopword removal + EDA swaps/deletions/synonyms
    vlp data rewrite-captions --input cc3m_original.csv --rule-based --num-rewrites 2 --out rewrites/

Input: webdataset shards (each sample's .txt, keyed by __key__), a LaCLIP CSV (`relpath,caption`, no
header) or a text file with one caption per line. Each caption gets one rewrite per prompt pool (LLM:
instruction line, 3 example pairs drawn from the pool, then the caption; temperature 0.9, top-p 0.95, up to
77 new tokens, cut at the first newline) or per rule variant. Empty or degenerate generations (prompt
echoes, the '=>' marker, over-long or repetitive text) are replaced by the original caption and counted.

Output (--out DIR, --name NAME): `--format lines` writes NAME_original.csv plus NAME_SOURCE.txt per source,
line-aligned (LaCLIP's layout); `--format jsonl` writes NAME_rewrites.jsonl with {"key", "rewrites"}.
Interrupted? Run the same command again: it continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from data_tools.outputs import check_name
from vlp.flags import Parser
from vlp.rewrite.pools import POOLS
from vlp.rewrite.sources import InputError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--input", required=True, help="shard spec (brace-expanded, '::'-joined), a .csv or a .txt file")
    p.add_argument("--input-format", default="auto", choices=["auto", "shards", "csv", "txt"])
    p.add_argument("--output", "--out", dest="out", required=True, help="output folder")
    p.add_argument("--name", default="captions", help="file name prefix in the output folder (default: captions)")
    p.add_argument("--format", default="lines", choices=["lines", "jsonl"],
                   help="lines: LaCLIP's line-aligned files; jsonl: {key, rewrites} per sample")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="local folder of a transformers causal LM (config, weights, tokenizer)")
    g.add_argument("--rule-based", action="store_true", help="no model: stopword removal + EDA operations")
    p.add_argument("--pools", nargs="+", default=list(POOLS),
                   help=f"LLM prompt pools, one rewrite each: built-in {', '.join(POOLS)}, or NAME=FILE / FILE "
                        "with lines 'source => target' (default: all built-in pools)")
    p.add_argument("--num-rewrites", type=int, default=4, help="rule-based: rewrites per caption")
    p.add_argument("--batch-size", type=int, default=16, help="captions per batch (one generation call per pool)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=77)
    p.add_argument("--examples", type=int, default=3, help="example pairs per prompt")
    p.add_argument("--seed", type=int, default=0, help="seeds every caption's prompt and sampling by its index")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--attn-implementation", default=None, help="passed to from_pretrained (e.g. eager, sdpa)")
    p.add_argument("--limit", type=int, default=None, help="only the first N captions (a later run may extend)")
    p.add_argument("--rewrites-field", default="rewrites", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="start over, deleting this run's earlier outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        from vlp.rewrite.runner import run_rewrites
        from vlp.rewrite.sources import open_input

        if a.batch_size < 1 or a.max_new_tokens < 1 or a.examples < 1:
            raise InputError("--batch-size, --max-new-tokens and --examples must be positive")
        if not 0 < a.top_p <= 1 or a.temperature < 0:
            raise InputError("--top-p must be in (0, 1] and --temperature >= 0")
        check_name(a.out, a.name, "--name", InputError)  # before --overwrite deletes anything
        fmt, records, total = open_input(a.input, a.input_format, a.rewrites_field)
        if a.rule_based:
            from vlp.rewrite.rewriters import RuleRewriter

            rewriter = RuleRewriter(a.num_rewrites, seed=a.seed)
        else:
            from vlp.rewrite.pools import resolve_pools
            from vlp.rewrite.rewriters import LLMRewriter

            rewriter = LLMRewriter(a.model, resolve_pools(a.pools), seed=a.seed, temperature=a.temperature,
                                   top_p=a.top_p, max_new_tokens=a.max_new_tokens, n_examples=a.examples,
                                   device=a.device, dtype=a.dtype, attn_implementation=a.attn_implementation)
        settings = {"input": a.input, "input_format": fmt}
        summary = run_rewrites(records, rewriter, a.out, name=a.name, fmt=a.format, batch_size=a.batch_size,
                               total=total, limit=a.limit, settings=settings, overwrite=a.overwrite,
                               progress=not a.no_progress)
    except (InputError, ValueError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    replaced = ", ".join(f"{k} {v}" for k, v in summary["replaced"].items() if v) or "none"
    print(f"{summary['samples']} captions, {summary['rewrites']} rewrites; replaced by the original: "
          f"{summary['replaced_total']} ({replaced}); unchanged: {summary['unchanged']}")
    print(json.dumps({"outputs": summary["outputs"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
