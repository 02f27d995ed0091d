"""Triton GPU kernel for the packed ternary linear (CUDA; batch-1 decode and small batches).

Same contract as `model.packed.kernels.reference.ternary_linear_reference`: x int8 (M, Kp), x_scale
float32 (M,), w uint8 (N, Kp / 4) in the 2-bit layout of `model.packed.packing`, one float w_scale;
y float32 (M, N) = exact integer dot / (x_scale * w_scale).

Decode reads each weight byte once: a program owns BLOCK_N output rows of one activation row and
walks K in chunks of BLOCK_B 128-code blocks. For a byte column c of a chunk (block c // 32,
byte c % 32), digit s (bits 2s..2s+1) is code k = 128 (c // 32) + 32 s + c % 32, so the four
shifted views of one (BLOCK_N, 32 BLOCK_B) byte tile meet four gathers of the activation row.
Products are accumulated in int32 (exact). Small batches run one program column per row; the
weights of a layer (<= 8 MB at 2 bits for the 1b shapes) stay in L2 across rows.

Importing this module needs `triton`; `model.packed.kernels` imports it only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ternary_linear_kernel(
    x_ptr, xs_ptr, w_ptr, y_ptr, w_scale, N, KP,
    stride_xm, stride_wn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    cols = tl.arange(0, BLOCK_B * 32)  # byte columns of a chunk
    x_cols = (cols // 32) * 128 + cols % 32  # code index of digit 0 of each byte
    row_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.int32)
    nbytes = KP // 4
    for c0 in range(0, nbytes, BLOCK_B * 32):
        col_ok = (c0 + cols) < nbytes
        p = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + c0 + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=85,  # 85 = 0b01010101: four zero codes
        ).to(tl.int32)  # (BLOCK_N, BLOCK_B * 32)
        k0 = c0 * 4
        for s in tl.static_range(4):
            xv = tl.load(x_ptr + m * stride_xm + k0 + x_cols + 32 * s, mask=col_ok, other=0).to(tl.int32)
            d = ((p >> (2 * s)) & 3) - 1  # (BLOCK_N, BLOCK_B * 32) codes in {-1, 0, 1}
            acc += tl.sum(d * xv[None, :], axis=1)
    denom = tl.load(xs_ptr + m) * w_scale
    y = tl.div_rn(acc.to(tl.float32), denom)  # IEEE division, as on CPU (Triton's `/` is approximate)
    tl.store(y_ptr + m * stride_ym + offs_n, y, mask=row_ok)


def ternary_linear_triton(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: float) -> torch.Tensor:
    """x: int8 (M, Kp) CUDA, x_scale: float32 (M,), w: uint8 (N, Kp / 4) -> float32 (M, N)."""
    m_rows, kp = x.shape
    n = w.shape[0]
    if kp % 128 or w.shape[1] * 4 != kp:
        raise ValueError(f"x (M, {kp}) and w {tuple(w.shape)} do not fit the 2-bit layout (Kp a multiple of 128)")
    x, x_scale, w = x.contiguous(), x_scale.float().contiguous(), w.contiguous()
    y = torch.empty(m_rows, n, device=x.device, dtype=torch.float32)
    block_n, block_b = 16, 4
    grid = (triton.cdiv(n, block_n), m_rows)
    _ternary_linear_kernel[grid](
        x, x_scale, w, y, float(w_scale), n, kp,
        x.stride(0), w.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_B=block_b,
    )
    return y
