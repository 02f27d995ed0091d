"""Which float type each part of a model runs in at inference, from the device and the CPU's features.

The frozen vision tower and projector are plain dense matmuls (ViT-L/14-336: about 0.3 TFLOP per
image), so on a CPU with native bf16 dot products (`avx512_bf16`, `amx_bf16`) they run about
twice as fast in bfloat16, and their features differ from float32 by bf16 rounding only
(tests/test_precision.py bounds it). Elsewhere bf16 is emulated and slower: float32 there. The
language model keeps the dtype it was given (float32 on CPU: numerically closest to training;
its packed linears compute in int8 either way).

`dtype: auto` (Serve's engine settings, `eval run`) means: the LLM in bfloat16 on a GPU and float32
on a CPU, the tower and projector in bfloat16 on a GPU or a native-bf16 CPU, else float32.
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
    if device.type == "cuda":
        return torch.bfloat16, torch.bfloat16
    return torch.float32, torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def set_vision_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast a multimodal model's tower and projector (a text-only model has neither: nothing to do)."""
    for name in ("vision_tower", "multi_modal_projector"):
        part = getattr(model, name, None)
        if part is not None:
            part.to(dtype)
