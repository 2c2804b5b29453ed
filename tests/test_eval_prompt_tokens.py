"""Composed prompt tokens equal open_clip's tokenizer on every prompt, and the composition is really used."""
import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from vlp.eval.datasets import fill_templates
from vlp.eval.prompt_tokens import tokenize_prompts


def _counting(tokenizer):
    """Count the tokenizer's per-text encode calls (its __call__ goes through the same attribute)."""
    calls = []
    real = tokenizer.encode

    def encode(text):
        calls.append(text)
        return real(text)

    tokenizer.encode = encode
    return calls


def test_imagenet_prompts_are_composed_exactly():
    tk = open_clip.get_tokenizer("ViT-B-32")
    classes, templates = list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES[::4])
    prompts, _ = fill_templates(classes, templates)
    ref = tk(prompts)
    calls = _counting(tk)
    fast = tokenize_prompts(tk, prompts, classes, templates)
    assert torch.equal(fast, ref)
    # Pieces, not prompts: at most one call per class name and two per template, plus the few fallbacks.
    assert len(calls) < len(classes) + 2 * len(templates) + 0.02 * len(prompts)


AWKWARD_CLASSES = ["café", "AT&T", "rock 'n' roll", "U.S.", "x-ray", "dog's", "", "  spaced  out ", "<start_of_text>",
                   "C3PO", "Σοφία", "amp;", "start_of_text>", "tab\there", "re", "s", "'", "...", "a b c d e f g h i j k l m n o", "42"]
AWKWARD_TEMPLATES = ["a photo of a {c}.", "{c}", "{c}{c}", "itap of the {c}'s", "'{c}'", "{c}...", "a '{c}", "{c}s",
                     "1{c}2", "no class here", "{c}'re", "&amp; {c}", "&{c}", "<{c}", lambda c: f"a {c.upper()}!", lambda c: f"the {c}"]


@pytest.mark.parametrize("context_length", [77, 8])
def test_awkward_joints_fall_back_to_the_tokenizer(context_length):
    tk = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    prompts, _ = fill_templates(AWKWARD_CLASSES, AWKWARD_TEMPLATES)
    ref = tk(prompts)
    calls = _counting(tk)
    assert torch.equal(tokenize_prompts(tk, prompts, AWKWARD_CLASSES, AWKWARD_TEMPLATES), ref)
    assert len(calls) < len(prompts)   # some were composed


def test_other_tokenizers_and_per_class_prompts_use_the_tokenizer():
    tk = open_clip.get_tokenizer("ViT-B-32")
    per_class = {"cat": ["a cat", "the cat."], "dog": ["a dog"]}
    prompts, _ = fill_templates(["cat", "dog"], per_class)
    assert torch.equal(tokenize_prompts(tk, prompts, ["cat", "dog"], per_class), tk(prompts))

    def plain(texts):
        return torch.tensor([[len(t)] for t in texts])

    prompts, _ = fill_templates(["cat", "dog"], ["a {c}.", "{c}"])
    assert torch.equal(tokenize_prompts(plain, prompts, ["cat", "dog"], ["a {c}.", "{c}"]), plain(prompts))
