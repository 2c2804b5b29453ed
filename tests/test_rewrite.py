"""Caption rewriting: prompt, guards, rule and LLM rewriters, output formats, resumption."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_tools import rewrite_captions
from data_tools.make_demo_data import write_train
from vlp.rewrite import prompt as P
from vlp.rewrite.pools import POOLS, load_pool_file, resolve_pools
from vlp.rewrite.rewriters import LLMRewriter, RuleRewriter, sample_top_p
from vlp.rewrite.runner import truncate_lines

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a small red circle above a blue square",
    "dog beach",
    "there is a large yellow diamond in the middle of the picture",
    "green cross, top",
    "",
    "Man in a suit crossing the street with an umbrella",
    "purple triangle",
]


def build_tiny_llama(out_dir: Path, seed: int = 0, vocab_size: int = 400) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    text = [f"{s} => {t}" for pool in POOLS.values() for s, t in pool]
    text += ["write image captions differently,", "a small red circle above a blue square\n\n"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny random-weight LLaMA-style model and a locally trained byte-level BPE tokenizer (no downloads)."""
    return build_tiny_llama(tmp_path_factory.mktemp("llm"))


@pytest.fixture
def captions_txt(tmp_path):
    p = tmp_path / "caps.txt"
    p.write_text("\n".join(CAPTIONS) + "\n")
    return p


def _lines(p):
    return Path(p).read_text(encoding="utf-8").split("\n")[:-1]


# ---------------------------------------------------------------- prompt and guards

def test_prompt_follows_laclip():
    pool = POOLS["descriptive"]
    prompt, used = P.build_prompt("red  square\nleft", pool, random.Random(0))
    blocks = prompt.split("\n\n")
    assert blocks[0] == "write image captions differently,"
    assert len(blocks) == 5 and len(used) == 3 and len(set(used)) == 3
    for block, (s, t) in zip(blocks[1:4], used):
        assert block == f"{s} => {t}" and (s, t) in pool
    assert blocks[4] == "red square left =>"
    assert P.build_prompt("x", pool, random.Random(0)) [1] == used  # examples drawn from the rng only
    draws = {tuple(P.build_prompt("x", pool, random.Random(s))[1]) for s in range(20)}
    assert len(draws) > 10


def test_cut_generation():
    assert P.cut_generation(" A red car parked at night.\n\nstreet => x") == "A red car parked at night."
    assert P.cut_generation("\nfoo") == ""


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("  ...  ", "empty"),
    ("a red car => a blue car", "marker"),
    ("write image captions differently,", "prompt_echo"),
    ("A red car is parked along a city street at night.", "prompt_echo"),  # a used example's target
    (" ".join(["word"] * 2 + ["other%d" % i for i in range(60)]), "too_long"),
    ("the dog the dog the dog", "repetitive"),
    ("abcabcabcabcabcabc xyz", "repetitive"),
    ("a red sports car parked on a quiet street", None),
])
def test_guard_reasons(text, reason):
    used = [POOLS["descriptive"][0]]
    out, why = P.guard(text, "red car street night", used)
    assert why == reason
    assert out == (text if reason is None else "red car street night")


def test_one_line_removes_every_line_break():
    s = P.one_line("a\nb\r\nc\u2028d\x85e\x0bf\tg\x07h")
    assert s == "a b c d e f g h" and len(s.splitlines()) == 1


def test_top_p_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # greedy and a tiny nucleus give the argmax
    assert sample_top_p(logits, torch.tensor([0.99]), 0.0, 0.95).item() == 0
    assert sample_top_p(logits, torch.tensor([0.99]), 1.0, 0.1).item() == 0
    # inverse CDF over the nucleus {0, 1, 2} (0.95 excludes the 0.05 tail), renormalised
    u = torch.linspace(0.0005, 0.9995, 1000)
    got = sample_top_p(logits.expand(1000, 4), u, 1.0, 0.9).bincount(minlength=4).float() / 1000
    assert torch.allclose(got, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.01)


def test_pool_files(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my pool\na => b\nc => d\n\n{\"source\": \"e\", \"target\": \"f\"}\n")
    assert load_pool_file(str(f)) == [("a", "b"), ("c", "d"), ("e", "f")]
    pools = resolve_pools(["concise", f"extra={f}", str(f)])
    assert list(pools) == ["concise", "extra", "mine"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a => b\nno marker here\nc => d\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_pool_file(str(bad))
    with pytest.raises(ValueError, match="unknown pool"):
        resolve_pools(["nope"])
    assert len(POOLS) >= 4 and all(len(v) >= 10 for v in POOLS.values())


# ---------------------------------------------------------------- rule-based

def test_rule_based_lines_format(tmp_path, captions_txt):
    out = tmp_path / "out"
    assert rewrite_captions.main(["--input", str(captions_txt), "--rule-based", "--num-rewrites", "3",
                                  "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
    rows = list(csv.reader(open(out / "captions_original.csv", newline="")))
    assert rows == [[str(i), " ".join(c.split())] for i, c in enumerate(CAPTIONS)]
    texts = [_lines(out / f"captions_rule{j}.txt") for j in (1, 2, 3)]
    assert all(len(t) == len(CAPTIONS) for t in texts)
    assert texts[0][4] == ""  # an empty caption stays empty, and in its row
    assert sum(t[i] != CAPTIONS[i] for t in texts for i in (0, 2, 5)) >= 6
    summary = json.loads((out / "captions.summary.json").read_text())
    assert summary["samples"] == len(CAPTIONS) and summary["rewrites"] == 3 * len(CAPTIONS)


def test_rule_based_csv_input_keeps_relpaths(tmp_path):
    src = tmp_path / "orig.csv"
    with open(src, "w", newline="") as f:
        csv.writer(f).writerows([["img/0.jpg", "a red, round circle"], ["img/1.jpg", 'a "quoted" square']])
    out = tmp_path / "o"
    assert rewrite_captions.main(["--input", str(src), "--rule-based", "--num-rewrites", "1", "--output", str(out),
                                  "--no-progress", "--format", "jsonl"]) == 0
    recs = [json.loads(x) for x in _lines(out / "captions_rewrites.jsonl")]
    assert [r["key"] for r in recs] == ["img/0.jpg", "img/1.jpg"] and all(len(r["rewrites"]) == 1 for r in recs)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, captions_txt):
    cases = [
        ["--input", str(tmp_path / "missing.txt"), "--rule-based", "--out", str(tmp_path / "o")],
        ["--input", str(tmp_path / "nope-{0..2}.tar"), "--rule-based", "--out", str(tmp_path / "o")],
        ["--input", str(captions_txt), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")],
        ["--input", str(captions_txt), "--model", str(tmp_path), "--out", str(tmp_path / "o")],  # not a model
    ]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("only-one-field\n")
    cases.append(["--input", str(bad_csv), "--rule-based", "--out", str(tmp_path / "o2")])
    for argv in cases:
        assert rewrite_captions.main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err


def test_rerun_with_other_settings_is_refused(tmp_path, captions_txt, capsys):
    base = ["--input", str(captions_txt), "--rule-based", "--out", str(tmp_path / "o"), "--no-progress"]
    assert rewrite_captions.main(base) == 0
    assert rewrite_captions.main(base + ["--seed", "1"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert rewrite_captions.main(base + ["--seed", "1", "--overwrite"]) == 0


def test_sigkill_midway_then_rerun_matches_uninterrupted(tmp_path):
    n = 4000
    src = tmp_path / "many.txt"
    src.write_text("".join(f"a photo of the small red circle number {i} on the left\n" for i in range(n)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cmd(out):
        return [sys.executable, "-m", "data_tools.rewrite_captions", "--input", str(src), "--rule-based",
                "--num-rewrites", "2", "--out", str(out), "--batch-size", "50", "--no-progress"]

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, env=env, cwd=ROOT, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prog = out / "captions.progress.json"
    deadline = time.time() + 60
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(prog.read_text())["done"]
        except (OSError, ValueError):
            done = 0
        if done >= 300:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 0 < done < n, (proc.returncode, done)
    # a half-written last line on top of whatever the kill left behind
    with open(out / "captions_rule2.txt", "a") as f:
        f.write("half a li")
    subprocess.run(cmd(out), check=True, env=env, cwd=ROOT, capture_output=True)
    for name in ("captions_original.csv", "captions_rule1.txt", "captions_rule2.txt"):
        a, b = (ref / name).read_bytes(), (out / name).read_bytes()
        assert b.count(b"\n") == n and a == b, name
    assert json.loads((out / "captions.summary.json").read_text())["samples"] == n


def test_truncate_lines(tmp_path):
    p = tmp_path / "f.txt"
    p.write_bytes(b"a\nbb\nccc\ndd")
    assert truncate_lines(p, 2, chunk=3) == 2 and p.read_bytes() == b"a\nbb\n"
    p.write_bytes(b"a\nbb\nccc\ndd")
    assert truncate_lines(p, 10) == 3 and p.read_bytes() == b"a\nbb\nccc\n"
    assert truncate_lines(p, 0) == 0 and p.read_bytes() == b""


# ---------------------------------------------------------------- LLM

def test_llm_generation_independent_of_batching(tiny_llm):
    pools = {k: POOLS[k] for k in ("descriptive", "concise")}
    r = LLMRewriter(str(tiny_llm), pools, max_new_tokens=12, seed=3)
    assert r.tokenizer.padding_side == "left" and r.tokenizer.pad_token is not None
    caps = CAPTIONS[:4]
    together = [[c.text for c in row] for row in r.rewrite(caps, [10, 11, 12, 13])]
    alone = [[c.text for c in r.rewrite([c], [10 + i])[0]] for i, c in enumerate(caps)]
    assert together == alone
    assert len({t for row in together for t in row}) > 4  # sampled, differs per caption and pool
    r2 = LLMRewriter(str(tiny_llm), pools, max_new_tokens=12, seed=4)
    assert [[c.text for c in row] for row in r2.rewrite(caps, [10, 11, 12, 13])] != together
    for row in together:
        assert all("\n" not in t for t in row)


def test_llm_stops_at_newline(tiny_llm):
    r = LLMRewriter(str(tiny_llm), {"descriptive": POOLS["descriptive"]}, max_new_tokens=30, temperature=0)
    newline_ids = r.tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline_ids) == 1 and r._stop[newline_ids[0]] and r._stop[r.tokenizer.eos_token_id]
    assert int(r._stop.sum()) < len(r.tokenizer) // 4
    full = r.generate(["a red car =>", "blue =>"], [1, 2])
    r._stop[:] = True  # every token ends the rewrite: each row stops after its first token
    first = r.generate(["a red car =>", "blue =>"], [1, 2])
    for f, one in zip(full, first):
        assert f.startswith(one)
        assert len(r.tokenizer.encode(one, add_special_tokens=False)) <= 1


def test_llm_cli_shards_jsonl_resume(tiny_llm, tmp_path, monkeypatch):
    shards = tmp_path / "train"
    write_train(shards, 11, 32, 5, seed=0, progress=False)
    spec = str(shards / "{00000..00002}.tar")
    argv = ["--input", spec, "--model", str(tiny_llm), "--pools", "descriptive", "scene", "--batch-size", "3",
            "--max-new-tokens", "10", "--format", "jsonl", "--no-progress"]
    assert rewrite_captions.main(argv + ["--out", str(tmp_path / "ref")]) == 0
    ref = _lines(tmp_path / "ref" / "captions_rewrites.jsonl")
    recs = [json.loads(x) for x in ref]
    assert [r["key"] for r in recs] == [f"{i:09d}" for i in range(11)]
    assert all(len(r["rewrites"]) == 2 and all(isinstance(t, str) for t in r["rewrites"]) for r in recs)
    summary = json.loads((tmp_path / "ref" / "captions.summary.json").read_text())
    assert summary["samples"] == 11 and summary["rewrites"] == 22
    assert summary["replaced_total"] == sum(summary["replaced"].values())
    from vlp.rewrite.sources import open_input

    caps = [rec.caption for rec in open_input(spec)[1]]
    same = sum(t == c for r, c in zip(recs, caps) for t in r["rewrites"])
    assert same >= summary["replaced_total"]  # every replaced rewrite is the original caption

    # interrupted after the 2nd batch's outputs were written but before its progress record
    from vlp.rewrite import runner

    calls = {"n": 0}
    real = runner.Outputs.save_progress

    def flaky(self, progress):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(self, progress)

    monkeypatch.setattr(runner.Outputs, "save_progress", flaky)
    with pytest.raises(KeyboardInterrupt):
        rewrite_captions.main(argv + ["--out", str(tmp_path / "run")])
    monkeypatch.setattr(runner.Outputs, "save_progress", real)
    part = tmp_path / "run" / "captions_rewrites.jsonl"
    assert len(_lines(part)) == 6  # two batches on disk, one recorded
    assert rewrite_captions.main(argv + ["--out", str(tmp_path / "run")]) == 0
    assert _lines(part) == ref
    # a finished run rerun is a no-op
    assert rewrite_captions.main(argv + ["--out", str(tmp_path / "run")]) == 0
    assert _lines(part) == ref


def test_llm_lines_format_alignment(tiny_llm, tmp_path, captions_txt):
    out = tmp_path / "o"
    assert rewrite_captions.main(["--input", str(captions_txt), "--model", str(tiny_llm), "--out", str(out),
                                  "--pools", "concise", "photographic", "--batch-size", "4",
                                  "--max-new-tokens", "8", "--name", "demo", "--no-progress"]) == 0
    orig = list(csv.reader(open(out / "demo_original.csv", newline="")))
    files = [_lines(out / f"demo_{s}.txt") for s in ("concise", "photographic")]
    assert len(orig) == len(CAPTIONS) and all(len(f) == len(CAPTIONS) for f in files)
    assert files[0][4] == "" and files[1][4] == ""
    summary = json.loads((out / "demo.summary.json").read_text())
    n_orig = sum(f[i] == " ".join(c.split()) for f in files for i, c in enumerate(CAPTIONS) if c)
    assert summary["replaced_total"] <= n_orig


def test_shard_rows_follow_samples(tmp_path):
    """Every sample is one row, in tar order: the CSV names a sample's json `source` when it has one."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        w.write({"__key__": "k0", "txt": "red circle", "json": json.dumps({"source": "img/a.jpg"})})
        w.write({"__key__": "k1", "jpg": b"x", "json": json.dumps({"caption": "blue  square"})})  # no .txt
        w.write({"__key__": "k2", "txt": "green\ncross"})
    out = tmp_path / "o"
    base = ["--input", str(tmp_path / "s.tar"), "--rule-based", "--num-rewrites", "1", "--no-progress"]
    assert rewrite_captions.main(base + ["--out", str(out)]) == 0
    rows = list(csv.reader(open(out / "captions_original.csv", newline="")))
    assert rows == [["img/a.jpg", "red circle"], ["k1", "blue square"], ["k2", "green cross"]]
    assert len(_lines(out / "captions_rule1.txt")) == 3
    assert rewrite_captions.main(base + ["--out", str(out / "j"), "--format", "jsonl"]) == 0
    assert [json.loads(x)["key"] for x in _lines(out / "j" / "captions_rewrites.jsonl")] == ["k0", "k1", "k2"]
