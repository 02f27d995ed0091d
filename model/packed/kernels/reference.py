"""Plain PyTorch reference for the packed ternary linear (any device, no compiled code).

It defines what every kernel must return, bit for bit:

    y[m, n] = float32(sum_k code[n, k] * x[m, k]) / (x_scale[m] * w_scale)

with x int8 (M, Kp), codes unpacked from the 2-bit layout (`model.packed.packing.unpack_2bit_rows`) and
the dot product exact. The products and partial sums are integers below 2^24 for Kp <= 131072, so
a float32 matmul computes them exactly; longer rows use float64.
"""

from __future__ import annotations

import torch

from model.packed.packing import unpack_2bit_rows


def ternary_linear_reference(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: float) -> torch.Tensor:
    """x: int8 (M, Kp), x_scale: float32 (M,), w: uint8 (N, Kp / 4) 2-bit rows -> float32 (M, N)."""
    kp = x.shape[1]
    exact = torch.float32 if kp * 128 < 2**24 else torch.float64
    codes = unpack_2bit_rows(w, kp)  # (N, Kp) int8, zero codes in the padding
    dots = (x.to(exact) @ codes.to(exact).T).float()  # (M, N), integer-valued
    return dots / (x_scale.float() * w_scale).unsqueeze(-1)


def head_reference(x: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """Output head with a low-precision weight: x float32 (M, K), w int8 or bf16 (N, K) -> float32 (M, N)."""
    y = x.float() @ w.float().T
    return y if row_scale is None else y * row_scale.float()
