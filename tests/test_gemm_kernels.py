"""The int8 GEMM path of the CPU kernel (ternary_gemm.cpp): every instruction path this CPU has,
forced one at a time, bit-identical to the reference; dispatch never picks a path the CPU lacks."""

import os
import subprocess
import sys

import pytest
import torch

from model.packed.kernels import cpu as cpu_kernels
from model.packed.kernels import packed_linear_forward
from model.packed.kernels.reference import ternary_linear_reference
from model.packed.packing import pack_2bit, padded_row_length

# /proc/cpuinfo flags each path needs (the OS clears AVX-512 flags when it does not save zmm state)
PATH_FLAGS = {
    "amx_int8": {"amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512vbmi"},
    "avx512_vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "avx_vnni": {"avx2", "avx_vnni"},
    "avx2": {"avx2"},
}
# M = 1, 3, 17, 600 token rows; K and N off the 16/8-lane vectors, the 48/16-row panels and 128-code blocks
SHAPES = [(1, 31, 3), (1, 300, 77), (3, 1000, 33), (3, 129, 49), (17, 2047, 129), (17, 64, 16), (600, 2100, 50),
          (600, 129, 700), (9, 4, 97), (40, 8192, 48)]


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture
def ext():
    module = cpu_kernels.load_cpu_kernels()
    assert module is not None, f"the CPU kernel must build on this machine: {cpu_kernels.cpu_kernel_failure()}"
    path, min_rows = module.gemm_path(), module.gemm_min_rows()
    yield module
    module.set_gemm_path(path)
    module.set_gemm_min_rows(min_rows)


def problem(m, k, n, g):
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    x = torch.zeros(m, padded_row_length(k), dtype=torch.int8)
    x[:, :k] = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    return codes, x, torch.rand(m, generator=g) * 100 + 1, float(torch.rand(1, generator=g) * 50 + 0.5)


def test_dispatch_offers_exactly_the_paths_this_cpu_has(ext):
    flags = cpu_flags()
    expected = [path for path, needs in PATH_FLAGS.items() if needs <= flags]
    assert ext.gemm_paths() == expected
    assert ext.gemm_path() == expected[0]  # the widest by default
    for path in PATH_FLAGS:
        if path in expected:
            ext.set_gemm_path(path)
            assert ext.gemm_path() == path
        else:  # a path the CPU lacks is refused, never run
            with pytest.raises(RuntimeError, match="cannot run"):
                ext.set_gemm_path(path)
            assert ext.gemm_path() in expected
    with pytest.raises(RuntimeError, match="unknown GEMM path"):
        ext.set_gemm_path("sse2")


def test_every_path_equals_the_reference(ext):
    ext.set_gemm_min_rows(1)  # the GEMM even at M = 1
    for path in ext.gemm_paths():
        ext.set_gemm_path(path)
        for m, k, n in SHAPES:
            seed = int.from_bytes(os.urandom(4), "little")
            codes, x, x_scale, w_scale = problem(m, k, n, torch.Generator().manual_seed(seed))
            got = ext.ternary_linear(x, x_scale, pack_2bit(codes).data, w_scale)
            want = ternary_linear_reference(x, x_scale, pack_2bit(codes).data, w_scale)
            assert torch.equal(got, want), f"{path} (M, K, N) = {(m, k, n)}, seed {seed}"


def test_every_path_holds_the_largest_sums(ext):
    # every activation -128 and every code +-1 over K = 8192: the int16 partial sums of the AVX2
    # path and the int32 accumulators meet their largest magnitudes
    ext.set_gemm_min_rows(1)
    k, n, m = 8192, 50, 9
    codes = torch.ones(n, k, dtype=torch.int8)
    codes[1::2] = -1
    x = torch.full((m, k), -128, dtype=torch.int8)
    expected = torch.tensor([-128.0 * k, 128.0 * k] * (n // 2)).expand(m, n)
    for path in ext.gemm_paths():
        ext.set_gemm_path(path)
        assert torch.equal(ext.ternary_linear(x, torch.ones(m), pack_2bit(codes).data, 1.0), expected), path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_sized_fused_forward_equals_the_python_path(ext, dtype):
    # rms_norm + quantisation (threaded over rows at this size) + each GEMM path; bf16 activations
    # come back in bf16, written by the GEMM itself on the paths that can (amx_int8)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = (torch.randn(600, 1000, generator=g) * torch.rand(600, 1, generator=g) * 8).to(dtype)
    x[5] = 0
    x[7, :37] = 3.0e-39  # subnormal inputs
    w = pack_2bit(torch.randint(-1, 2, (70, 1000), dtype=torch.int8, generator=g)).data
    assert 600 >= ext.gemm_min_rows()
    for path in ext.gemm_paths():
        ext.set_gemm_path(path)
        # a huge weight scale makes outputs that are subnormal in float32 and bf16, which the bf16
        # rounding must keep as PyTorch's cast does
        for w_scale in (3.0, 1.0e36):
            got = packed_linear_forward(x, 1e-5, w, w_scale, "cpu")
            assert got.dtype == dtype
            assert torch.equal(got, packed_linear_forward(x, 1e-5, w, w_scale, "reference")), (path, w_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantisation_matches_the_python_path_at_every_row_length(ext, dtype):
    # the vectorised quantisation (8 lanes) and its scalar tail; rows of zeros and of ties (x.5 after scaling)
    from model.bitlinear import activation_scale

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for k in (1, 7, 8, 9, 130, 1000):
        x_n = (torch.randn(40, k, generator=g) * 5).to(dtype)
        x_n[3] = 0
        x_n[4] = torch.arange(k, dtype=torch.float32).to(dtype) * 0.5 - k / 4  # amax k/4: many exact halves
        codes = torch.randint(-1, 2, (16, k), dtype=torch.int8, generator=g)
        w = pack_2bit(codes).data
        s_x = activation_scale(x_n)
        x_i = (x_n * s_x).round().clamp(-128, 127).to(torch.int8)
        x_i = torch.nn.functional.pad(x_i, (0, w.shape[1] * 4 - k))
        want = ternary_linear_reference(x_i, s_x.reshape(-1).float(), w, 2.0)
        got = ext.ternary_linear_normed(x_n.contiguous(), w, 2.0)
        assert torch.equal(got, want), k


def run_with_env(value: str) -> subprocess.CompletedProcess:
    code = "import json; from model.packed.kernels.cpu import kernel_info; print(json.dumps(kernel_info()))"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, cpu_kernels.GEMM_ENV: value},
                          capture_output=True, text=True, timeout=300)


def test_the_path_can_be_forced_from_the_environment(ext):
    out = run_with_env("avx2")
    assert out.returncode == 0, out.stderr
    assert '"gemm_path": "avx2"' in out.stdout
    out = run_with_env("rows")
    assert out.returncode == 0 and '"gemm_min_rows": 4611686018427387904' in out.stdout
    missing = [path for path in PATH_FLAGS if path not in ext.gemm_paths()] or ["neon"]
    out = run_with_env(missing[0])
    assert out.returncode != 0 and f"{cpu_kernels.GEMM_ENV}={missing[0]!r}: this CPU can run" in out.stderr
