"""Packed models: the same ternary LM (any backbone) and BitLLaVA with PackedBitLinear blocks.

Sources: BitNet b1.58 inference (Ma et al., 2024; bitnet.cpp) for the packed block linears
(`model.packed.packed_linear`); LLM.int8()-style per-row absmax int8 (Dettmers et al., 2022, without the
outlier split) for the optional int8 output head. DESIGN.md section 7: once the block linears are
2-bit, the tied head (50304 x 2048) is a large share of the bytes read per decoded token, so the
head can run from an int8 copy (1 byte per weight, one float32 scale per row).

`PackedOLMoBitNetForCausalLM` is `OLMoBitNetForCausalLM` with a pluggable head:
- "dense" (default): logits = h @ wte[:V]^T from the embedding itself (on CPU with bf16 weights
  the AVX2 kernel computes it with float32 accumulation, otherwise `F.linear`, as the LM does);
- "int8": logits from an int8 copy of wte[:V] with per-row scales (weight-only quantisation:
  h stays in float, the int8 rows are widened inside the kernel).

Other backbones (transformers LMs) keep their own `lm_head` (tied or not) for "dense"; "int8" swaps it
for an `Int8Head` of its weight (`set_head`).

`empty_packed_model(config)` builds a model whose BitLinear158 layers are PackedBitLinear from the
start (constructed on the meta device, so no float block weights are ever allocated or
initialised); its other weights are initialised as usual and then overwritten by a loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from model.bitlinear import BitLinear158
from model.packed.kernels import BACKENDS, head_matmul, resolve_backend
from model.backbones import build_causal_lm
from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
from model.checkpoint import retie
from model.multimodal import BitLlavaConfig, BitLlavaForConditionalGeneration
from model.packed.packed_linear import PackedBitLinear

HEADS = ("dense", "int8")


class Int8Head(nn.Module):
    """logits = h @ (q * s)^T with q int8 (V, d) = round(W / s), s = max|W_row| / 127 per row.

    The float32 row scales are kept as their int32 bit pattern so that `model.to(dtype)` never
    rounds them (it casts floating tensors only).
    """

    def __init__(self, weight: torch.Tensor, backend: str = "auto", rows_per_step: int = 4096):
        super().__init__()
        self.backend = backend
        rows, d = weight.shape
        q = torch.empty(rows, d, dtype=torch.int8, device=weight.device)  # (V, d)
        scale = torch.empty(rows, dtype=torch.float32, device=weight.device)  # (V,)
        with torch.no_grad():
            for r in range(0, rows, rows_per_step):  # a few MB of float temporaries at a time
                w = weight[r : r + rows_per_step].detach().float()
                s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
                q[r : r + rows_per_step] = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
                scale[r : r + rows_per_step] = s
        self.register_buffer("weight_q", q, persistent=False)
        self.register_buffer("scale_bits", scale.view(torch.int32), persistent=False)

    @property
    def row_scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (..., d) -> (..., V)
        lead, d = h.shape[:-1], h.shape[-1]
        backend = resolve_backend(h.device, self.backend)
        y = head_matmul(h.reshape(-1, d).float(), self.weight_q, self.row_scale, backend)
        return y.to(h.dtype).reshape(*lead, -1)

    def extra_repr(self) -> str:
        return f"rows={self.weight_q.shape[0]}, d={self.weight_q.shape[1]}, int8 per-row absmax"


class PackedOLMoBitNetForCausalLM(OLMoBitNetForCausalLM):
    """OLMoBitNetForCausalLM whose head is "dense" (the tied embedding) or "int8" (`Int8Head`)."""

    def __init__(self, config: OLMoBitNetConfig):
        super().__init__(config)
        self.int8_head: Int8Head | None = None
        self.head_backend = "auto"

    def set_head(self, head: str, backend: str = "auto") -> None:
        """Choose the head ("dense" or "int8") and its kernel backend ("reference": plain PyTorch)."""
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; choose one of {list(BACKENDS)}")
        self.head_backend = backend
        self.int8_head = Int8Head(self.head_weight(), backend) if head == "int8" else None

    @property
    def head_kind(self) -> str:
        return "int8" if self.int8_head is not None else "dense"

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, V)."""
        if self.int8_head is not None:
            return self.int8_head(h)
        w = self.head_weight()  # (V, d), a row prefix of wte: contiguous
        if w.dtype == torch.bfloat16 and h.shape[-1] % 8 == 0 and resolve_backend(h.device, self.head_backend) == "cpu":
            lead = h.shape[:-1]
            y = head_matmul(h.reshape(-1, h.shape[-1]).float(), w, None, "cpu")
            return y.to(h.dtype).reshape(*lead, -1)
        return F.linear(h, w)


def language_model(model: nn.Module) -> nn.Module:
    return model.language_model if isinstance(model, BitLlavaForConditionalGeneration) else model


def set_head(model: nn.Module, head: str, backend: str = "auto") -> None:
    """Choose the output head of a packed model: "dense" (the model's own) or "int8" (`Int8Head`)."""
    lm = language_model(model)
    if isinstance(lm, PackedOLMoBitNetForCausalLM):
        lm.set_head(head, backend)
        return
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {list(BACKENDS)}")
    if head == "int8" and not isinstance(lm.lm_head, Int8Head):
        lm.lm_head = Int8Head(lm.lm_head.weight, backend)  # a tied embedding keeps its own tensor


def _packed_lm(config) -> nn.Module:
    """The LM of `config` as a packed model builds it (OLMo-Bitnet gets the pluggable-head subclass)."""
    return PackedOLMoBitNetForCausalLM(config) if isinstance(config, OLMoBitNetConfig) else build_causal_lm(config)


def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Fill buffers that no checkpoint holds (CLIP's position_ids) with their owners' `_init_weights`."""
    owners = {name: m for name, m in model.named_modules() if isinstance(m, PreTrainedModel)}
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set and not isinstance(module, PackedBitLinear):
            owner = max((n for n in owners if n == "" or name == n or name.startswith(n + ".")), key=len)
            owners[owner]._init_weights(module)


@torch.no_grad()
def empty_packed_model(config, dtype: torch.dtype = torch.float32,
                       initialise: bool = True, device: str = "cpu"):
    """The skeleton of a packed model of `config` in `dtype`, for a loader to fill.

    Block linears are PackedBitLinear whose code buffers are allocated but not written (never
    touched, they take no resident memory): the caller loads every one (`load_packed_weights`,
    `random_packed_model`). With `initialise` every other weight is freshly initialised; without
    it they are left for the loader too, and only buffers no checkpoint holds are filled.
    """
    with torch.device("meta"):
        if isinstance(config, BitLlavaConfig):
            model = BitLlavaForConditionalGeneration(config)
            model.language_model = _packed_lm(config.text_config)
        else:
            model = _packed_lm(config)
        for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear158)]:
            model.set_submodule(name, PackedBitLinear.like(module))
    model.to(dtype)  # on meta: free, and the real tensors are then allocated once, in `dtype`
    model.to_empty(device=device)
    retie(model)  # to_empty gives a tied head a tensor of its own
    if initialise:
        model.initialize_weights()
    else:
        _init_non_persistent_buffers(model)
    return model.eval()
