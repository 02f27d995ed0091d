"""The AVX2 CPU kernels against the plain PyTorch reference, on fresh random data every run."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model.bitlinear import BitLinear158
from model.packed.kernels import cpu as cpu_kernels
from model.bitlinear import rms_norm
from model.packed.kernels import head_matmul, packed_linear_forward, resolve_backend, ternary_linear, ternary_linear_normed
from model.packed.kernels.reference import head_reference, ternary_linear_reference
from model.packed.packed_linear import PackedBitLinear, set_backend
from model.packed.packing import pack_2bit, padded_row_length

# (M tokens, K in, N out): K and N off the 32-byte register width and the 128-code block, N off
# the 512-row chunks and their 4 stripes, M around the 4-token groups, the 1b shapes at batch 1.
SHAPES = [
    (1, 1, 1), (1, 31, 3), (1, 128, 5), (1, 300, 77), (2, 129, 64), (3, 1000, 33), (4, 257, 130),
    (5, 640, 96), (9, 200, 7), (16, 384, 65), (1, 2048, 6144), (1, 8192, 2048), (3, 2048, 2048), (2, 2048, 1500),
    (7, 2048, 1100), (0, 256, 8),
]


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


@pytest.fixture(scope="module")
def ext():
    module = cpu_kernels.load_cpu_kernels()
    assert module is not None, f"the AVX2 kernel must build on this machine: {cpu_kernels.cpu_kernel_failure()}"
    return module


def random_problem(m, k, n, g):
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    kp = padded_row_length(k)
    x = torch.zeros(m, kp, dtype=torch.int8)
    x[:, :k] = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    x_scale = torch.rand(m, generator=g) * 100 + 1
    w_scale = float(torch.rand(1, generator=g) * 50 + 0.5)
    return codes, pack_2bit(codes).data, x, x_scale, w_scale


def test_cpu_is_chosen_automatically(ext):
    assert cpu_kernels.cpu_supports_avx2()
    assert resolve_backend(torch.device("cpu"), "auto") == "cpu"
    assert resolve_backend(torch.device("cpu"), "reference") == "reference"


@pytest.mark.parametrize("m,k,n", SHAPES, ids=str)
def test_cpu_kernel_equals_reference(ext, m, k, n):
    g, seed = fresh_generator()
    codes, w, x, x_scale, w_scale = random_problem(m, k, n, g)
    got = ext.ternary_linear(x, x_scale, w, w_scale)
    want = ternary_linear_reference(x, x_scale, w, w_scale)
    assert torch.equal(got, want), f"(M, K, N) = {(m, k, n)}, seed {seed}"
    # and the reference is the plain definition: exact integer dot, one float rescale
    dots = (x[:, :k].long() @ codes.long().T).float()
    assert torch.equal(want, dots / (x_scale * w_scale)[:, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 2048, 64), (6, 300, 40), (4, 8192, 9)], ids=str)
def test_fused_quantisation_equals_the_python_quantiser(ext, dtype, m, k, n):
    # bf16 products x_n * s_x in [64, 128) are multiples of 0.5, so ties to even are common here
    g, seed = fresh_generator()
    x_n = rms_norm(torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10, 1e-5).to(dtype)
    x_n[0, 0] = 40.0  # an outlier sets the scale of row 0
    if m > 2:
        x_n[2] = 0  # an all-zero token
    w = pack_2bit(torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)).data
    s_w = float(torch.rand(1, generator=g) * 40 + 1)
    got = ext.ternary_linear_normed(x_n, w, s_w)
    want = ternary_linear_normed(x_n, w, s_w, "reference")
    assert torch.equal(got, want), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 2048), (7, 300), (64, 8192), (3, 129)], ids=str)
def test_fused_forward_equals_the_python_path(ext, dtype, m, k):
    # rms_norm + quantisation + packed linear in one call against model.bitlinear's functions
    g, seed = fresh_generator()
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 8).to(dtype)
    x[-1] = 0 if m > 1 else x[-1]
    w = pack_2bit(torch.randint(-1, 2, (40, k), dtype=torch.int8, generator=g)).data
    got = packed_linear_forward(x, 1e-5, w, 3.0, "cpu")
    want = packed_linear_forward(x, 1e-5, w, 3.0, "reference")
    assert got.dtype == dtype and torch.equal(got, want), f"seed {seed}"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
def test_cpu_kernel_extremes_do_not_saturate(ext, m):
    # every activation -128 and every code +1 or -1: the largest sums the int16 partial sums meet
    k, n = 8192, 8
    codes = torch.ones(n, k, dtype=torch.int8)
    codes[1::2] = -1
    x = torch.full((m, k), -128, dtype=torch.int8)
    y = ext.ternary_linear(x, torch.ones(m), pack_2bit(codes).data, 1.0)
    expected = torch.tensor([-128.0 * k, 128.0 * k] * (n // 2)).expand(m, n)
    assert torch.equal(y, expected)


def test_cpu_kernel_rejects_bad_shapes(ext):
    w = pack_2bit(torch.zeros(4, 256, dtype=torch.int8)).data
    with pytest.raises(RuntimeError, match="bytes per row"):
        ext.ternary_linear(torch.zeros(1, 128, dtype=torch.int8), torch.ones(1), w, 1.0)
    with pytest.raises(RuntimeError, match="int8"):
        ext.ternary_linear(torch.zeros(1, 256), torch.ones(1), w, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n", [((1, 1), 2048, 300), ((2, 7), 257, 64), ((3,), 96, 1000)], ids=str)
def test_packed_linear_backends_agree_and_match_training_forward(ext, dtype, lead, k, n):
    g, seed = fresh_generator()
    layer = BitLinear158(k, n)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02, generator=g)
    layer = layer.to(dtype)  # codes and s_w come from the weights the training forward sees
    packed = PackedBitLinear.from_bitlinear(layer)
    x = (torch.randn(*lead, k, generator=g) * 3).to(dtype)
    with torch.no_grad():
        packed.backend = "cpu"
        fast = packed(x)
        packed.backend = "reference"
        slow = packed(x)
        train = layer(x)
    assert fast.dtype == dtype and fast.shape == (*lead, n)
    assert torch.equal(fast, slow), f"seed {seed}"
    if dtype == torch.float32:
        torch.testing.assert_close(fast, train, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    else:  # the training forward rounds x_q, w_q and its output to bf16; the packed one only its output
        scale = float(train.float().abs().max())
        torch.testing.assert_close(fast.float(), train.float(), rtol=1.6e-2, atol=1e-2 * scale, msg=f"seed {seed}")


@pytest.mark.parametrize("m,k,n", [(1, 2048, 1001), (3, 64, 37), (1, 8, 5)], ids=str)
def test_head_kernels_match_reference(ext, m, k, n):
    g, seed = fresh_generator()
    x = torch.randn(m, k, generator=g)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) / 100
    torch.testing.assert_close(head_matmul(x, w8, scale, "cpu"), head_reference(x, w8, scale), rtol=1e-5, atol=1e-4,
                               msg=f"seed {seed}")
    wb = torch.randn(n, k, generator=g).bfloat16()
    torch.testing.assert_close(head_matmul(x, wb, None, "cpu"), F.linear(x, wb.float()), rtol=1e-5, atol=1e-4,
                               msg=f"seed {seed}")


def test_backend_requests_that_cannot_run_are_errors():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend(torch.device("cpu"), "cuda")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        resolve_backend(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        set_backend(torch.nn.Sequential(PackedBitLinear(8, 8)), "fast")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        PackedBitLinear(8, 8, backend="fast")(torch.randn(1, 8))


def test_reference_path_when_the_kernel_is_disabled(tmp_path):
    # a fresh process without the kernel: the model still runs, on the reference path
    code = (
        "import torch\n"
        "from model.packed.kernels import resolve_backend\n"
        "from model.packed.kernels.cpu import cpu_kernel_failure\n"
        "from model.bitlinear import BitLinear158\n"
        "from model.packed.packed_linear import PackedBitLinear\n"
        "assert resolve_backend(torch.device('cpu')) == 'reference'\n"
        "layer = BitLinear158(200, 30)\n"
        "x = torch.randn(2, 200)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(PackedBitLinear.from_bitlinear(layer)(x), layer(x), rtol=1e-5, atol=1e-6)\n"
        "print(cpu_kernel_failure())\n"
    )
    env = {**os.environ, "BITLLAVA_DISABLE_CPU_KERNEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "disabled by BITLLAVA_DISABLE_CPU_KERNEL" in out.stdout


def test_build_failure_falls_back_with_the_reason(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "ternary_cpu.cpp"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", [str(broken)])
    monkeypatch.setenv("BITLLAVA_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_kernels.load_cpu_kernels.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert cpu_kernels.load_cpu_kernels() is None
        assert "build failed" in cpu_kernels.cpu_kernel_failure()
        assert "using the PyTorch reference path" in caplog.text
        assert resolve_backend(torch.device("cpu"), "auto") == "reference"
        with pytest.raises(ValueError, match="CPU kernel is unavailable"):
            resolve_backend(torch.device("cpu"), "cpu")
        x = torch.randint(-128, 128, (2, 128), dtype=torch.int8)
        w = pack_2bit(torch.randint(-1, 2, (3, 128), dtype=torch.int8)).data
        y = ternary_linear(x, torch.ones(2), w, 1.0, resolve_backend(torch.device("cpu"), "auto"))
        assert torch.equal(y, ternary_linear_reference(x, torch.ones(2), w, 1.0))
    finally:
        monkeypatch.undo()
        cpu_kernels.load_cpu_kernels.cache_clear()
        cpu_kernels._failure = None
    assert cpu_kernels.load_cpu_kernels() is not None
