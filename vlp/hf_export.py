"""Export a vlp/open_clip model as a Hugging Face transformers `CLIPModel` folder (weights, config, processor).

Maps open_clip's built-in `CLIP` (a ViT image tower with a class token and pre/post LayerNorms, open_clip's
own causal text transformer with argmax or EOS pooling, GELU or QuickGELU, no layer scale) one tensor at a
time: attention `in_proj` splits into q/k/v, `c_fc`/`c_proj` become `fc1`/`fc2`, the `proj` matrices become
bias-free Linear layers. Anything else (timm or ModifiedResNet image towers, Hugging Face text towers,
attentional pooling, layer scale) raises ExportError naming what does not map. A SigLIP `logit_bias` has no
place in `CLIPModel`: it is left out (and said so); the embeddings are unaffected.

The processor is `CLIPImageProcessor` (the model's resize/crop/mean/std) plus `CLIPTokenizer` files built
from open_clip's BPE vocabulary (same ids) for models using open_clip's tokenizer; a `--tokenizer hf:`/`spm:`
run gets the tokenizer files `save_tokenizer_files` writes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from vlp.flags import Parser


class ExportError(ValueError):
    """The model's architecture has no transformers CLIPModel equivalent; one line says why."""


def _check(model) -> None:
    import open_clip
    import torch
    from open_clip.transformer import VisionTransformer

    if type(model) is not open_clip.CLIP:
        raise ExportError(f"{type(model).__name__} (a Hugging Face or custom text tower) does not map to CLIPModel")
    v = model.visual
    if not isinstance(v, VisionTransformer):
        raise ExportError(f"image tower {type(v).__name__} does not map to CLIPModel (ViT only)")
    if getattr(v, "attn_pool", None) is not None or v.pool_type != "tok" or getattr(v, "final_ln_after_pool", False):
        raise ExportError("the image tower pools otherwise than CLIP's class token")
    if isinstance(v.ln_pre, torch.nn.Identity) or v.proj is None:
        raise ExportError("the image tower lacks ln_pre or its projection")
    if model.text_pool_type not in ("argmax", "eos"):
        raise ExportError(f"text pooling '{model.text_pool_type}' does not map to CLIPModel")
    for block in list(v.transformer.resblocks) + list(model.transformer.resblocks):
        if not isinstance(block.ls_1, torch.nn.Identity) or not isinstance(getattr(block, "ln_attn", torch.nn.Identity()), torch.nn.Identity):
            raise ExportError("layer scale / extra attention norms do not map to CLIPModel")


def _act(block) -> str:
    import open_clip.transformer as T
    import torch

    act = block.mlp.gelu
    if isinstance(act, T.QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ExportError(f"activation {type(act).__name__} does not map to CLIPModel")


def hf_config(model, eos_token_id: int):
    from transformers import CLIPConfig

    v, t = model.visual, model.transformer
    vb, tb = v.transformer.resblocks[0], t.resblocks[0]
    text = dict(vocab_size=model.vocab_size, hidden_size=t.width, intermediate_size=tb.mlp.c_fc.out_features,
                num_hidden_layers=t.layers, num_attention_heads=tb.attn.num_heads,
                max_position_embeddings=model.context_length, hidden_act=_act(tb),
                layer_norm_eps=model.ln_final.eps, projection_dim=model.text_projection.shape[1],
                eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1)
    size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size
    patch = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else v.patch_size
    vision = dict(hidden_size=v.transformer.width, intermediate_size=vb.mlp.c_fc.out_features,
                  num_hidden_layers=v.transformer.layers, num_attention_heads=vb.attn.num_heads,
                  image_size=size, patch_size=patch, hidden_act=_act(vb), layer_norm_eps=v.ln_pre.eps,
                  projection_dim=v.proj.shape[1])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=v.proj.shape[1],
                      logit_scale_init_value=float(model.logit_scale.detach()))


def _blocks(prefix: str, blocks) -> dict:
    out = {}
    for i, b in enumerate(blocks):
        p = f"{prefix}.encoder.layers.{i}"
        q, k, v = b.attn.in_proj_weight.chunk(3)
        qb, kb, vb = b.attn.in_proj_bias.chunk(3)
        out.update({
            f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": k, f"{p}.self_attn.v_proj.weight": v,
            f"{p}.self_attn.q_proj.bias": qb, f"{p}.self_attn.k_proj.bias": kb, f"{p}.self_attn.v_proj.bias": vb,
            f"{p}.self_attn.out_proj.weight": b.attn.out_proj.weight, f"{p}.self_attn.out_proj.bias": b.attn.out_proj.bias,
            f"{p}.layer_norm1.weight": b.ln_1.weight, f"{p}.layer_norm1.bias": b.ln_1.bias,
            f"{p}.layer_norm2.weight": b.ln_2.weight, f"{p}.layer_norm2.bias": b.ln_2.bias,
            f"{p}.mlp.fc1.weight": b.mlp.c_fc.weight, f"{p}.mlp.fc1.bias": b.mlp.c_fc.bias,
            f"{p}.mlp.fc2.weight": b.mlp.c_proj.weight, f"{p}.mlp.fc2.bias": b.mlp.c_proj.bias,
        })
    return out


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    v = model.visual
    sd = {
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
        "text_projection.weight": model.text_projection.T,
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.pre_layrnorm.weight": v.ln_pre.weight, "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
        "vision_model.post_layernorm.weight": v.ln_post.weight, "vision_model.post_layernorm.bias": v.ln_post.bias,
        "visual_projection.weight": v.proj.T,
        "logit_scale": model.logit_scale.reshape(()),
        **_blocks("text_model", model.transformer.resblocks),
        **_blocks("vision_model", v.transformer.resblocks),
    }
    return {k: t.detach().float().cpu().contiguous() for k, t in sd.items()}


def _clip_tokenizer_files(out: Path, context_length: int) -> None:
    """open_clip's BPE vocabulary as a CLIPTokenizer (same ids; open_clip's <start_of_text>/<end_of_text> are
    transformers' <|startoftext|>/<|endoftext|>)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges],
                  model_max_length=context_length).save_pretrained(str(out))


def export_hf_clip(model, preprocess_cfg: dict, out_dir, tokenizer: Optional[str] = None,
                   text_cfg: Optional[dict] = None) -> Path:
    """Write `out_dir` with a transformers CLIPModel (model.safetensors + config.json) and its processor files;
    `CLIPModel.from_pretrained(out_dir)` / `CLIPProcessor.from_pretrained(out_dir)` load it."""
    from transformers import CLIPImageProcessor, CLIPModel

    _check(model)
    eos = 2 if model.text_pool_type == "argmax" else int(model.text_eos_id)  # 2: transformers' argmax pooling
    if model.text_pool_type == "eos" and eos == 2:
        raise ExportError("EOS id 2 would switch transformers to argmax pooling")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(model, eos)
    hf = CLIPModel(cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"weights do not map: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.save_pretrained(str(out))
    from vlp.models import umask_mode

    for weights in out.glob("*.safetensors"):
        umask_mode(weights)
    size = preprocess_cfg.get("size", cfg.vision_config.image_size)
    size = size[0] if isinstance(size, (list, tuple)) else size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(preprocess_cfg.get("mean")), image_std=list(preprocess_cfg.get("std")),
                       resample=3).save_pretrained(str(out))  # 3: bicubic, as open_clip's val transform
    if tokenizer or (text_cfg or {}).get("hf_tokenizer_name"):
        from vlp.tokenizers import save_tokenizer_files

        save_tokenizer_files(tokenizer, text_cfg or {}, out)
    else:
        _clip_tokenizer_files(out, model.context_length)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """`vlp export-hf --checkpoint CKPT_OR_EXPORT --output DIR [--model NAME]`"""
    import argparse
    import sys

    p = Parser(description="Write a transformers CLIPModel + CLIPProcessor folder from a vlp "
                                            "checkpoint, export folder or open_clip file (ViT CLIP architectures).")
    p.add_argument("--checkpoint", required=True, help="vlp checkpoint, export folder, or open_clip file (with --model)")
    p.add_argument("--model", default=None, help="open_clip model name for an open_clip weights file")
    p.add_argument("--tokenizer", default=None, help="hf:DIR or spm:FILE (default: the checkpoint's)")
    p.add_argument("--output", required=True, help="folder to write")
    a = p.parse_args(argv)   # before torch is imported: --help answers at once
    import open_clip

    from vlp.config import ConfigError
    from vlp.models import load_checkpoint, read_checkpoint_meta

    try:
        bundle = load_checkpoint(a.checkpoint, model_name=a.model, tokenizer=a.tokenizer)
        tokenizer = a.tokenizer or (read_checkpoint_meta(a.checkpoint) or {}).get("tokenizer") \
            if Path(a.checkpoint).is_file() else a.tokenizer
        text_cfg = bundle.model_cfg.get("text_cfg", {})
        if Path(a.checkpoint).is_dir():  # an export folder: its tokenizer files are beside the weights
            text_cfg = {**text_cfg, "hf_tokenizer_name": a.checkpoint} if text_cfg.get("hf_tokenizer_name") else text_cfg
        out = export_hf_clip(bundle.model, open_clip.get_model_preprocess_cfg(bundle.model), a.output,
                             tokenizer=tokenizer, text_cfg=text_cfg)
    except (ConfigError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (transformers: CLIPModel.from_pretrained / CLIPProcessor.from_pretrained)")
    return 0
