"""The language-model backbones a BitLLaVA model can be built on, one registry for all of them.

Each backbone is a causal LM class keyed by its config's `model_type` (as transformers keys its
Auto classes; `olmo_bitnet` is registered with `AutoConfig` here so a composite config can hold it):

    model_type    class                      published layout it loads
    olmo_bitnet   OLMoBitNetForCausalLM      NousResearch/OLMo-Bitnet-1B (OLMo config, model.transformer.*)
    bitnet        TernaryBitNetForCausalLM   microsoft/bitnet-b1.58-2B-4T(-bf16) (transformers BitNet)
    llama         TernaryLlamaForCausalLM    any transformers Llama folder (Llama 3, Falcon-E, ...)
    qwen2         TernaryQwen2ForCausalLM    any transformers Qwen2 folder (Qwen2.5, ...)
    olmo, olmo2   TernaryOlmo(2)ForCausalLM  transformers OLMo / OLMo-2 folders

`model.multimodal`, the checkpoint and packed loaders and serving all go through `backbone()` and
`build_causal_lm()`; nothing else switches on `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PreTrainedConfig

from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
from model.backbones.ternary_transformers import (TernaryBitNetForCausalLM, TernaryLlamaForCausalLM,
                                                  TernaryOlmo2ForCausalLM, TernaryOlmoForCausalLM,
                                                  TernaryQwen2ForCausalLM)

try:
    AutoConfig.register(OLMoBitNetConfig.model_type, OLMoBitNetConfig)
except ValueError:  # already registered (a re-import)
    pass


@dataclass(frozen=True)
class Backbone:
    """model_type: the config's. causal_lm: the ternary LM class. published: the layout it loads.
    image_token: "spare row" (the embedding is padded past the vocabulary: `<image>` takes a spare
    row, never predicted) or "added row" (the embedding and head grow by one row, mean-initialised).
    bitlinear_input_norm: every BitLinear RMS-normalises its own input (else the model's norms do)."""

    model_type: str
    family: str
    causal_lm: type
    published: str
    tokenizer: str
    image_token: str
    bitlinear_input_norm: bool
    ternary: str


BACKBONES: dict[str, Backbone] = {b.model_type: b for b in (
    Backbone("olmo_bitnet", "OLMo-Bitnet", OLMoBitNetForCausalLM,
             "OLMo config.json + model.transformer.* (NousResearch/OLMo-Bitnet-1B)", "GPT-NeoX-20B (OLMo)",
             "spare row", True, "every block linear (att_proj, attn_out, ff_proj, ff_out)"),
    Backbone("bitnet", "BitNet b1.58 (2B-4T)", TernaryBitNetForCausalLM,
             "transformers BitNet (microsoft/bitnet-b1.58-2B-4T-bf16)", "LLaMA 3 (folder's own)",
             "added row", False, "q/k/v/o, gate/up/down; SubLN norms before o_proj and down_proj"),
    Backbone("llama", "Llama", TernaryLlamaForCausalLM, "transformers Llama (save_pretrained)",
             "folder's own", "added row", True, "q/k/v/o, gate/up/down"),
    Backbone("qwen2", "Qwen2", TernaryQwen2ForCausalLM, "transformers Qwen2 (save_pretrained)",
             "folder's own", "added row", True, "q/k/v/o (q/k/v biases stay full precision), gate/up/down"),
    Backbone("olmo", "OLMo", TernaryOlmoForCausalLM, "transformers OLMo (save_pretrained)",
             "folder's own", "added row", True, "q/k/v/o, gate/up/down"),
    Backbone("olmo2", "OLMo-2", TernaryOlmo2ForCausalLM, "transformers OLMo-2 (save_pretrained)",
             "folder's own", "added row", True, "q/k/v/o, gate/up/down (q/k norms stay full precision)"),
)}


def backbone(model_type: str | None) -> Backbone:
    if model_type not in BACKBONES:
        raise ValueError(f"unsupported language model type {model_type!r}; supported: {sorted(BACKBONES)}")
    return BACKBONES[model_type]


def text_config_from_dict(raw: dict) -> PreTrainedConfig:
    """The config object of an LLM config.json dict of any registered backbone."""
    model_type = backbone(raw.get("model_type")).model_type  # refuses an unsupported one by name
    return AutoConfig.for_model(model_type).__class__.from_dict(raw)


def build_causal_lm(config: PreTrainedConfig):
    """A fresh (randomly initialised) ternary LM of `config`."""
    return backbone(config.model_type).causal_lm(config)


def context_length(config: PreTrainedConfig) -> int:
    """Longest sequence the LM is configured for (OLMo's max_sequence_length is an alias)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value if value is not None else config.max_sequence_length)


def hidden_size(config: PreTrainedConfig) -> int:
    return int(config.hidden_size)


def embedding_rows(config: PreTrainedConfig) -> int:
    """Rows of the input embedding (OLMo pads past its vocabulary; transformers LMs do not)."""
    return int(getattr(config, "embedding_size", None) or config.vocab_size)


def predicted_vocab(config: PreTrainedConfig) -> int:
    return int(config.vocab_size)
