"""Packing ternary codes: 2-bit and 1.6-bit round trips, layouts, sizes, bad input."""

import os

import pytest
import torch

from model.bitlinear import ternary_codes
from model.packed.packing import (
    FORMATS,
    PackedTernary,
    pack,
    pack_1p6bit,
    pack_2bit,
    packed_nbytes,
    to_runtime,
    unpack,
    unpack_2bit_rows,
)

AWKWARD_SHAPES = [(), (1,), (7,), (1, 1), (3, 5), (2, 127), (4, 129), (33, 200), (2, 3, 7), (5, 128), (1, 1000), (0, 9)]


def random_codes(shape, generator):
    return torch.randint(-1, 2, shape, dtype=torch.int8, generator=generator)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
def test_round_trip_awkward_shapes(fmt, shape):
    seed = int.from_bytes(os.urandom(4), "little")  # fresh data every run; the seed is in the failure message
    codes = random_codes(shape, torch.Generator().manual_seed(seed))
    packed = pack(codes, fmt)
    assert packed.data.dtype == torch.uint8 and packed.shape == shape and packed.format == fmt
    assert packed.data.numel() == packed_nbytes(shape, fmt)
    back = unpack(packed)
    assert back.dtype == torch.int8 and back.shape == codes.shape
    assert torch.equal(back, codes), f"round trip failed for {fmt} {shape} (seed {seed})"
    assert torch.equal(unpack(to_runtime(packed)), codes)


def test_2bit_layout_is_interleaved_blocks_of_128():
    # one row of 256 codes = 2 blocks; code k of block b sits in byte 32 b + k % 32, bits 2 (k // 32 % 4)
    codes = torch.zeros(1, 256, dtype=torch.int8)
    codes[0, 0] = 1  # block 0, byte 0, bits 0-1 -> digit 2
    codes[0, 33] = -1  # block 0, byte 1, bits 2-3 -> digit 0
    codes[0, 128 + 96 + 5] = 1  # block 1, byte 5, bits 6-7 -> digit 2
    data = pack_2bit(codes).data
    assert data.shape == (1, 64)
    zero = 0b01010101  # four zero codes
    assert data[0, 0].item() == 0b01010110
    assert data[0, 1].item() == 0b01010001
    assert data[0, 32 + 5].item() == 0b10010101
    others = [i for i in range(64) if i not in (0, 1, 37)]
    assert (data[0, others] == zero).all()


def test_2bit_pads_rows_with_zero_codes():
    codes = torch.ones(3, 130, dtype=torch.int8)
    data = pack_2bit(codes).data
    assert data.shape == (3, 64)  # 130 codes -> 256 per row
    full = unpack_2bit_rows(data, 256)
    assert (full[:, :130] == 1).all() and (full[:, 130:] == 0).all()


def test_1p6bit_is_base3_least_significant_first():
    codes = torch.tensor([-1, 0, 1, 1, 0, 1], dtype=torch.int8)  # digits 0 1 2 2 1 | 2 (1 1 1 1 padding)
    packed = pack_1p6bit(codes)
    assert packed.data.tolist() == [0 + 3 * 1 + 9 * 2 + 27 * 2 + 81 * 1, 2 + 3 + 9 + 27 + 81]
    assert packed.data.max() <= 242


def test_bits_per_weight():
    codes = torch.zeros(64, 2048, dtype=torch.int8)
    assert pack(codes, "2bit").bits_per_weight == 2.0
    assert 1.6 <= pack(codes, "1.6bit").bits_per_weight <= 1.6001


def test_codes_from_the_training_quantiser_survive_packing():
    w = torch.randn(96, 300)
    codes, s_w = ternary_codes(w)
    for fmt in FORMATS:
        back = unpack(pack(codes, fmt)).float() / s_w
        assert torch.equal(back, (w * s_w).round().clamp(-1, 1) / s_w)


def test_bad_codes_are_refused():
    with pytest.raises(ValueError, match="must be int8"):
        pack(torch.zeros(3, 4), "2bit")
    with pytest.raises(ValueError, match=r"must lie in \{-1, 0, 1\}"):
        pack(torch.tensor([[0, 2]], dtype=torch.int8), "1.6bit")
    with pytest.raises(ValueError, match="unknown packing format"):
        pack(torch.zeros(2, dtype=torch.int8), "3bit")


def test_mis_shaped_packed_data_is_refused():
    good = pack(torch.zeros(4, 130, dtype=torch.int8), "2bit")
    with pytest.raises(ValueError, match=r"must be uint8 \(4, 64\)"):
        unpack(PackedTernary(good.data[:, :32], good.shape, "2bit"))
    with pytest.raises(ValueError, match="must be uint8"):
        unpack(PackedTernary(good.data.to(torch.int16), good.shape, "2bit"))
