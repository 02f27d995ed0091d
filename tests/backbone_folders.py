"""Tiny LLM folders in the published transformers layouts (config.json, model.safetensors, tokenizer.json),
one per backbone family, written with transformers' own classes: what `save_pretrained` of the real
models writes, at a CPU size. The shapes are deliberately awkward: GQA, hidden and MLP widths that are
not multiples of 128, vocabularies that are not multiples of 64, tied and untied heads."""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer
from transformers import (AutoConfig, BitNetForCausalLM, LlamaForCausalLM, Olmo2ForCausalLM, OlmoForCausalLM,
                          PreTrainedTokenizerFast, Qwen2ForCausalLM)

from model.tokenizer import _tiny_tokenizer_json

# family -> (model class, special tokens of its published tokenizer, config fields)
FAMILIES = {
    "llama": (LlamaForCausalLM, dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None),
              dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0)),
    "qwen2": (Qwen2ForCausalLM, dict(bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
                                     extra=["<|im_start|>", "<|im_end|>"]),
              dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, pad_vocab_to=128)),
    "olmo": (OlmoForCausalLM, dict(bos=None, eos="<|endoftext|>", pad="<|padding|>"),
             dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, tie_word_embeddings=False, clip_qkv=8.0)),
    "olmo2": (Olmo2ForCausalLM, dict(bos=None, eos="<|endoftext|>", pad="<|pad|>"),
              dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)),
    "bitnet": (BitNetForCausalLM, dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None),
               dict(hidden_size=80, intermediate_size=112, num_hidden_layers=2, num_attention_heads=5,
                    num_key_value_heads=1, tie_word_embeddings=True, hidden_act="relu2", rope_theta=500000.0)),
}


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE with `family`'s special tokens, as its published tokenizer.json has them."""
    specials = FAMILIES[family][1]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()), model_max_length=512)
    named = {k + "_token": v for k, v in specials.items() if k in ("bos", "eos", "pad") and v}
    tok.add_special_tokens({**named, "additional_special_tokens": specials.get("extra", [])})
    return tok


def write_llm_folder(folder: str, family: str, seed: int = 0) -> str:
    """A random-weight LLM of `family` saved as transformers saves the published one."""
    cls, _, fields = FAMILIES[family]
    fields = dict(fields)
    tokenizer = family_tokenizer(family)
    multiple = fields.pop("pad_vocab_to", 1)
    vocab = -(-len(tokenizer) // multiple) * multiple
    config = AutoConfig.for_model(family, vocab_size=vocab, max_position_embeddings=512,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **fields)
    torch.manual_seed(seed)
    model = cls(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    return folder


# vision towers as `save_pretrained` writes them: CLIP's (CLS + 16 patches at 64 px) and SigLIP's (no CLS,
# 25 patches at 60 px with its pooling head, as google/siglip-* publish it)
TOWER_FIELDS = {
    "clip": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, patch_size=16,
                 image_size=64, projection_dim=32, hidden_act="quick_gelu"),
    "siglip": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=2, patch_size=12,
                   image_size=60, hidden_act="gelu_pytorch_tanh", vision_use_head=True),
}


def write_tower_folder(folder: str, kind: str, seed: int = 0, full_model: bool = False) -> str:
    """A random CLIP or SigLIP vision tower; `full_model`: the whole two-tower model (CLIPModel / SiglipModel) as
    the hub's openai/clip-* and google/siglip-* checkpoints hold it."""
    from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipConfig, SiglipModel,
                              SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(seed)
    fields = TOWER_FIELDS[kind]
    vision = (CLIPVisionConfig if kind == "clip" else SiglipVisionConfig)(**fields)
    if full_model:
        text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        if kind == "clip":
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=32))
        else:
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision.to_dict()))
    else:
        model = (CLIPVisionModel if kind == "clip" else SiglipVisionModel)(vision)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
