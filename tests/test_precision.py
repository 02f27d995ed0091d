"""The inference dtypes of `dtype: auto`: the tower and projector in bf16 only where the CPU has
native bf16, and their bf16 features close to float32's (bf16 rounding, nothing more)."""

import copy

import torch
from PIL import Image

from model.precision import NATIVE_BF16_FLAGS, cpu_has_native_bf16, resolve_dtypes, set_vision_dtype
from model.vision import preprocess_images


def test_auto_follows_the_device_and_the_cpus_bf16_support():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    native = any(flag in flags for flag in NATIVE_BF16_FLAGS)
    assert cpu_has_native_bf16() == native
    assert resolve_dtypes("auto", torch.device("cpu")) == ((torch.bfloat16,) * 2 if native else (torch.float32,) * 2)
    assert resolve_dtypes("auto", torch.device("cuda")) == (torch.bfloat16, torch.bfloat16)
    assert resolve_dtypes("float32", torch.device("cpu")) == (torch.float32, torch.float32)
    assert resolve_dtypes("bfloat16", torch.device("cpu")) == (torch.bfloat16, torch.bfloat16)


def test_bf16_tower_features_stay_close_to_float32(tiny_mm):
    model, _, processor = tiny_mm
    images = [Image.effect_noise((40, 30), 60).convert("RGB"), Image.new("RGB", (32, 32), (200, 30, 90))]
    pixels = preprocess_images(images, processor)
    with torch.no_grad():
        want = model.project(model.encode_images(pixels))  # float32
        half = copy.deepcopy(model)
        set_vision_dtype(half, torch.bfloat16)
        assert half.vision_tower.dtype == torch.bfloat16 and half.language_model.dtype == torch.float32
        got = half.project(half.encode_images(pixels))
    assert got.dtype == torch.bfloat16
    # relative to the features' scale: bf16 keeps 8 bits of mantissa (2^-8 = 0.4%); a dozen layers of
    # rounding stay within a few percent, while a wrong cast or a dropped layer is of order 100%
    error = (got.float() - want).norm() / want.norm()
    assert error < 0.03, f"relative error {error:.4f}"
    assert error > 0  # really computed in bf16
