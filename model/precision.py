"""Which float type each part of a model runs in at inference, from the device and the CPU's features.

The frozen vision tower and projector are plain dense matmuls (ViT-L/14-336: about 0.3 TFLOP per
image), so on a CPU with native bf16 dot products (`avx512_bf16`, `amx_bf16`) they run about
twice as fast in bfloat16, and their features differ from float32 by bf16 rounding only
(tests/test_precision.py bounds it). Elsewhere bf16 is emulated and slower: float32 there. The
language model follows the same rule: its packed linears compute in int8 either way, and in
bf16 the rest of it (attention, norms, the KV cache) moves half the bytes, and the AMX GEMM
writes its bf16 outputs directly (measured on an AMX machine, one image question of the `1b`
preset: 2.18 s in bf16 against 2.64 s in float32, four at once 8.6 s against 16.0 s).

`dtype: auto` (Serve's engine settings, `eval run`) means: everything in bfloat16 on a GPU or a
native-bf16 CPU, else float32.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = ("auto", "bfloat16", "float32")  # the settings resolve_dtypes takes


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU reports bf16 dot-product instructions (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_dtypes(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(LLM dtype, vision tower + projector dtype) for a dtype setting: "auto", "bfloat16" or "float32"."""
    if dtype != "auto":
        chosen = getattr(torch, dtype)
        return chosen, chosen
    if device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16, torch.bfloat16
    return torch.float32, torch.float32


def set_vision_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast a multimodal model's tower and projector (a text-only model has neither: nothing to do)."""
    for name in ("vision_tower", "multi_modal_projector"):
        part = getattr(model, name, None)
        if part is not None:
            part.to(dtype)
