"""Packed ternary codes: 2-bit (4 trits per byte) and 1.6-bit (5 trits per byte).

Sources: the BitNet b1.58 papers (Ma et al., 2024) for the codes {-1, 0, 1} and one absmean
scale per tensor (computed by `model.bitlinear.ternary_codes`); bitnet.cpp's I2_S and
transformers' BitNet packing for 2 bits per weight; llama.cpp's TQ1_0 for base-3 packing of
5 trits per byte (3^5 = 243 <= 256). DESIGN.md section 7.

Both formats store the digit d = code + 1 in {0, 1, 2}.

2-bit (`"2bit"`), also the layout every kernel reads (`model.packed.kernels`). A tensor of shape
(..., K) is viewed as R = prod(...) rows of K codes; each row is padded with zero codes to
Kp = ceil(K / 128) * 128 and stored as Kp / 4 bytes. Within each block of 128 codes, byte j
(0 <= j < 32) holds codes j, j + 32, j + 64, j + 96 in bits 0-1, 2-3, 4-5, 6-7, so one
32-byte load, four shifts and masks yield 4 x 32 consecutive codes (one AVX2 register each):

    data: uint8 (R, Kp // 4)        code[r, 128 b + 32 s + j] = ((data[r, 32 b + j] >> 2 s) & 3) - 1

1.6-bit (`"1.6bit"`), a storage format. The flattened codes are padded to a multiple of 5 and
every 5 digits become one base-3 byte, least significant digit first:

    data: uint8 (ceil(numel / 5),)  byte = d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4  (<= 242)

Kernels run on the 2-bit layout; a 1.6-bit file is converted to it when loaded
(`to_runtime`), so 1.6 bits per weight is what is stored and moved, 2 bits what is served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMATS = ("2bit", "1.6bit")
BLOCK = 128  # codes per interleaved 2-bit block (32 bytes, one AVX2 register)
_SUB = BLOCK // 4  # bytes per block, and codes per sub-block
_SHIFTS_2BIT = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)


@dataclass
class PackedTernary:
    """Packed ternary codes of one tensor (the scale s_w travels beside it).

    data: uint8 bytes in `format`'s layout (see the module docstring).
    shape: the true shape of the code tensor (padding is dropped on unpacking).
    format: "2bit" or "1.6bit".
    """

    data: torch.Tensor
    shape: tuple[int, ...]
    format: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.data.numel() / max(self.numel, 1)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown packing format {fmt!r}; choose one of {list(FORMATS)}")
    return fmt


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(R, K): rows and row length of the 2-D view of a code tensor (0-d and 1-d are one row)."""
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def padded_row_length(k: int) -> int:
    """Kp: a row of k codes padded to whole 128-code blocks."""
    return -(-k // BLOCK) * BLOCK


def packed_nbytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes that `pack(codes of shape, fmt)` produces (used to validate files before reading them)."""
    check_format(fmt)
    if fmt == "2bit":
        rows, k = _rows(tuple(shape))
        return rows * padded_row_length(k) // 4
    return -(-math.prod(shape) // 5)


def packed_shape(shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    """Shape of the `data` tensor of a packed tensor of `shape` in `fmt`."""
    if check_format(fmt) == "2bit":
        rows, k = _rows(tuple(shape))
        return (rows, padded_row_length(k) // 4)
    return (packed_nbytes(shape, fmt),)


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dtype != torch.int8:
        raise ValueError(f"ternary codes must be int8 (got {codes.dtype}); make them with model.bitlinear.ternary_codes")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"ternary codes must lie in {{-1, 0, 1}} (got values in [{int(codes.min())}, {int(codes.max())}])")


def pack_2bit(codes: torch.Tensor) -> PackedTernary:
    """int8 codes (..., K) -> 2-bit interleaved rows (R, Kp / 4)."""
    _check_codes(codes)
    shape = tuple(codes.shape)
    rows, k = _rows(shape)
    kp = padded_row_length(k)
    digits = torch.ones(rows, kp, dtype=torch.uint8)  # digit 1 == code 0 in the padding
    digits[:, :k] = (codes.reshape(rows, k).cpu() + 1).to(torch.uint8)
    d = digits.view(rows, kp // BLOCK, 4, _SUB)  # (R, blocks, 4 sub-blocks, 32)
    data = d[:, :, 0] | (d[:, :, 1] << 2) | (d[:, :, 2] << 4) | (d[:, :, 3] << 6)  # (R, blocks, 32)
    return PackedTernary(data=data.reshape(rows, kp // 4).contiguous(), shape=shape, format="2bit")


def unpack_2bit_rows(data: torch.Tensor, k: int) -> torch.Tensor:
    """2-bit rows (R, Kp / 4) uint8 -> int8 codes (R, k): the plain-PyTorch unpack (any device)."""
    rows, nbytes = data.shape
    shifts = _SHIFTS_2BIT.to(data.device).view(1, 1, 4, 1)
    d = (data.view(rows, nbytes // _SUB, 1, _SUB) >> shifts) & 3  # (R, blocks, 4, 32)
    return d.reshape(rows, nbytes * 4)[:, :k].to(torch.int8) - 1


def pack_1p6bit(codes: torch.Tensor) -> PackedTernary:
    """int8 codes (any shape) -> base-3 bytes, 5 codes each (ceil(numel / 5),)."""
    _check_codes(codes)
    shape = tuple(codes.shape)
    n = codes.numel()
    groups = -(-n // 5)
    digits = torch.ones(groups * 5, dtype=torch.int16)
    digits[:n] = codes.reshape(-1).cpu().to(torch.int16) + 1
    data = (digits.view(groups, 5) * _POW3).sum(-1, dtype=torch.int16).to(torch.uint8)  # (groups,)
    return PackedTernary(data=data, shape=shape, format="1.6bit")


def unpack_1p6bit(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Base-3 bytes -> int8 codes of `shape`."""
    n = math.prod(shape)
    d = data.to(torch.int16).view(-1, 1)  # (groups, 1)
    digits = torch.div(d, _POW3.to(data.device), rounding_mode="floor") % 3  # (groups, 5)
    return (digits.reshape(-1)[:n].to(torch.int8) - 1).reshape(shape)


def pack(codes: torch.Tensor, fmt: str) -> PackedTernary:
    """Pack int8 ternary codes in `fmt` ("2bit" or "1.6bit")."""
    return pack_2bit(codes) if check_format(fmt) == "2bit" else pack_1p6bit(codes)


def unpack(packed: PackedTernary) -> torch.Tensor:
    """The int8 codes of `packed`, in their true shape."""
    check_format(packed.format)
    expected = packed_shape(packed.shape, packed.format)
    if tuple(packed.data.shape) != expected or packed.data.dtype != torch.uint8:
        raise ValueError(
            f"packed data of a {packed.format} tensor of shape {packed.shape} must be uint8 {expected}, "
            f"got {packed.data.dtype} {tuple(packed.data.shape)}"
        )
    if packed.format == "1.6bit":
        return unpack_1p6bit(packed.data, packed.shape)
    rows, k = _rows(packed.shape)
    return unpack_2bit_rows(packed.data, k).reshape(packed.shape)


def to_runtime(packed: PackedTernary) -> PackedTernary:
    """The 2-bit layout the kernels read (a no-op for 2-bit data)."""
    return packed if packed.format == "2bit" else pack_2bit(unpack(packed))
