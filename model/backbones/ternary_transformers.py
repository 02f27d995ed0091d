"""transformers' decoder LLMs made ternary: Llama, Qwen2, OLMo, OLMo-2 and BitNet (b1.58 2B-4T).

Sources: Ma et al., "The Era of 1-bit LLMs" (2024) and "BitNet b1.58 2B4T Technical Report" (2025);
transformers' `modeling_{llama,qwen2,olmo,olmo2,bitnet}.py`, whose classes these subclass unchanged.

Ternary means what BitNet b1.58 quantises: every linear inside a decoder layer (q/k/v/o projections,
the MLP's gate/up/down) becomes a `BitLinear158` over the same weight and bias tensors, so the state
dict keeps the published key names (`model.layers.{i}.self_attn.q_proj.weight`, ...) and a
`save_pretrained` folder of the full-precision model loads as is. Embeddings, the output head (tied
or not) and every norm stay full precision.

Whether a BitLinear normalises its own input belongs to the backbone:
- BitNet 2B-4T was trained with SubLN: an RMSNorm before `o_proj` (`attn_sub_norm`) and before
  `down_proj` (`ffn_sub_norm`), besides the pre-attention and pre-MLP norms, so every BitLinear input
  is already normalised and the layer only quantises it (`input_norm=False`);
- a full-precision Llama / Qwen2 / OLMo / OLMo-2 has no norm before `o_proj` and `down_proj`, so each
  BitLinear normalises its input with the non-affine RMSNorm of OLMo-Bitnet (`input_norm=True`).
"""

from __future__ import annotations

from torch import nn
from transformers import (BitNetForCausalLM, LlamaForCausalLM, Olmo2ForCausalLM, OlmoForCausalLM,
                          Qwen2ForCausalLM)

from model.bitlinear import BitLinear158


def ternarize_decoder_layers(lm: nn.Module, input_norm: bool, eps: float) -> int:
    """Swap every nn.Linear inside `lm.model.layers` for a BitLinear158 on the same tensors; returns how many."""
    swapped = 0
    for layer in lm.model.layers:
        for name, module in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
            layer.set_submodule(name, BitLinear158.from_linear(module, eps, input_norm))
            swapped += 1
    return swapped


def _ternary(base: type, input_norm: bool) -> type:
    """`base` (a transformers *ForCausalLM) whose decoder linears are BitLinear158 from construction on."""

    def __init__(self, config):
        base.__init__(self, config)
        # BitLinear's own norm uses the model's eps (OLMo's LayerNorm has no rms_norm_eps: 1e-5 as OLMo-Bitnet)
        ternarize_decoder_layers(self, input_norm, getattr(config, "rms_norm_eps", 1e-5))

    doc = (f"{base.__name__} with ternary decoder linears (BitLinear158, "
           f"{'own input RMSNorm' if input_norm else 'no own norm: the SubLN norms precede every BitLinear'}).")
    return type(f"Ternary{base.__name__}", (base,), {"__init__": __init__, "__doc__": doc,
                                                      "bitlinear_input_norm": input_norm})


TernaryLlamaForCausalLM = _ternary(LlamaForCausalLM, input_norm=True)
TernaryQwen2ForCausalLM = _ternary(Qwen2ForCausalLM, input_norm=True)
TernaryOlmoForCausalLM = _ternary(OlmoForCausalLM, input_norm=True)
TernaryOlmo2ForCausalLM = _ternary(Olmo2ForCausalLM, input_norm=True)
TernaryBitNetForCausalLM = _ternary(BitNetForCausalLM, input_norm=False)
