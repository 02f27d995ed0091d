"""Kernels for packed ternary linears, chosen by device.

Backends (all compute `reference.ternary_linear_reference`'s function, bit for bit on CPU):
- "cpu": the AVX2 C++ extension (`cpu.py`, `ternary_cpu.cpp`), compiled on first use;
- "triton": the Triton kernel (`triton_ternary.py`) for CUDA tensors;
- "reference": plain PyTorch, any device (tests, and machines where neither builds).

`resolve_backend(device, "auto")` picks "cpu" for CPU tensors when the extension loads,
"triton" for CUDA tensors when triton imports, else "reference".
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F

from model.bitlinear import activation_scale, rms_norm
from model.packed.kernels.cpu import cpu_kernel_failure, load_cpu_kernels
from model.packed.kernels.reference import head_reference, ternary_linear_reference

BACKENDS = ("auto", "cpu", "triton", "reference")
CPU_DTYPES = (torch.float32, torch.bfloat16)  # activation dtypes the CPU kernel takes


@lru_cache(maxsize=1)
def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def resolve_backend(device: torch.device, requested: str = "auto") -> str:
    """The backend that runs on `device`; an explicit request that cannot run is a ValueError."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; choose one of {list(BACKENDS)}")
    if requested == "reference":
        return "reference"
    if device.type == "cpu" and requested in ("auto", "cpu"):
        if load_cpu_kernels() is not None:
            return "cpu"
        if requested == "cpu":
            raise ValueError(f"the CPU kernel is unavailable: {cpu_kernel_failure()}")
        return "reference"
    if device.type == "cuda" and requested in ("auto", "triton"):
        if triton_available():
            return "triton"
        if requested == "triton":
            raise ValueError("the Triton kernel needs CUDA and the `triton` package")
        return "reference"
    if requested == "auto":
        return "reference"
    raise ValueError(f"backend {requested!r} cannot run on {device.type} tensors")


def ternary_linear(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: float, backend: str) -> torch.Tensor:
    """x: int8 (M, Kp), x_scale: float32 (M,), w: uint8 (N, Kp / 4) -> float32 (M, N) with a resolved backend."""
    if backend == "cpu":
        return load_cpu_kernels().ternary_linear(x, x_scale, w, float(w_scale))
    if backend == "triton":
        from model.packed.kernels.triton_ternary import ternary_linear_triton

        return ternary_linear_triton(x, x_scale, w, w_scale)
    return ternary_linear_reference(x, x_scale, w, w_scale)


def packed_linear_forward(x: torch.Tensor, eps: float, w: torch.Tensor, w_scale: float, backend: str) -> torch.Tensor:
    """BitLinear158's inference forward on packed weights: x (M, K) -> y (M, N) in x's dtype.

    rms_norm (non-affine), per-token int8 quantisation and the packed linear; on CPU one
    compiled call does all three with the same arithmetic as `model.bitlinear`.
    """
    if backend == "cpu" and x.dtype in CPU_DTYPES:
        return load_cpu_kernels().ternary_linear_fused(x, float(eps), w, float(w_scale))
    if backend == "cpu":
        backend = "reference"  # e.g. float16 activations: plain PyTorch
    return ternary_linear_normed(rms_norm(x, eps), w, w_scale, backend).to(x.dtype)


def packed_linear_unnormed(x: torch.Tensor, w: torch.Tensor, w_scale: float, backend: str) -> torch.Tensor:
    """BitLinear158's forward without its own norm (BitNet 2B-4T): x (M, K) -> y (M, N) in x's dtype."""
    if backend == "cpu" and x.dtype not in CPU_DTYPES:
        backend = "reference"
    return ternary_linear_normed(x.contiguous(), w, w_scale, backend).to(x.dtype)


def ternary_linear_normed(x_n: torch.Tensor, w: torch.Tensor, w_scale: float, backend: str) -> torch.Tensor:
    """x_n = rms_norm(x): (M, K) float -> float32 (M, N): per-token int8 quantisation, then the packed linear.

    The CPU kernel quantises inside the same call; other backends use `model.bitlinear`'s functions.
    Both give the same int8 values and scales (tests/test_packed_kernels.py).
    """
    if backend == "cpu":
        return load_cpu_kernels().ternary_linear_normed(x_n.contiguous(), w, float(w_scale))
    s_x = activation_scale(x_n)  # (M, 1)
    x_i = (x_n * s_x).round().clamp(-128, 127).to(torch.int8)  # (M, K)
    kp = w.shape[1] * 4
    if kp != x_i.shape[1]:
        x_i = F.pad(x_i, (0, kp - x_i.shape[1]))  # (M, Kp), zeros past K
    return ternary_linear(x_i.contiguous(), s_x.reshape(-1).float(), w, w_scale, backend)


def head_matmul(x: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x float32 (M, K) @ w.T for an int8 (with row_scale) or bf16 weight (N, K) -> float32 (M, N)."""
    if backend == "cpu" and x.shape[1] % 8 == 0:
        ext = load_cpu_kernels()
        x = x.float().contiguous()
        return ext.int8_head(x, w, row_scale) if row_scale is not None else ext.bf16_head(x, w)
    return head_reference(x, w, row_scale)
