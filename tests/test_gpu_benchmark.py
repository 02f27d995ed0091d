"""benchmarks/gpu.py's CPU-side logic: arguments, the JSON line, the skip without a GPU, the arithmetic
behind bandwidth and MFU, the kernel check's verdicts and the training step on a tiny config."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = _load("bench_gpu", SCRIPT)


def _last_json(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    assert lines, stdout
    return json.loads(lines[-1])


# ---- the skip, as a subprocess ------------------------------------------------------------------

@no_cuda
def test_script_skips_without_cuda_and_exits_0():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # one JSON line, nothing else on stdout
    line = _last_json(proc.stdout)
    assert line["benchmark"] == "gpu" and line["skipped"] == "no CUDA device"
    assert line["cuda_available"] is False and line["torch"] == torch.__version__


@no_cuda
def test_gpu_sh_requires_a_gpu_and_writes_the_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr  # --require-gpu: a device run without CUDA must not look fine
    line = _last_json(proc.stdout)
    assert line["skipped"] == "no CUDA device"
    assert json.loads((tmp_path / "gpu.json").read_text()) == line
    assert "no .whl/*.whl carried" in proc.stderr


def test_run_all_lists_gpu_benchmark():
    run_all = _load("bench_run_all", os.path.join(ROOT, "benchmarks", "run_all.py"))
    assert "gpu.py" in run_all.BENCHMARKS


# ---- arguments ----------------------------------------------------------------------------------

def test_parse_args_defaults_and_sections():
    args = gpu.parse_args([])
    assert args.sections == list(gpu.SECTIONS) and not args.quick and not args.require_gpu
    assert (args.train_batch, args.train_seq, args.train_steps) == (4, 2048, 5)
    assert gpu.parse_args(["--sections", "check, train"]).sections == ["check", "train"]
    quick = gpu.parse_args(["--quick", "--train-batch", "8"])
    assert (quick.train_batch, quick.train_seq, quick.train_steps) == (1, 512, 2)


@pytest.mark.parametrize("argv", [["--sections", "check,bogus"], ["--sections", ","], ["--train-batch", "0"],
                                  ["--train-steps", "-1"]])
def test_parse_args_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(argv)


# ---- pure arithmetic, against hand-computed values ------------------------------------------------

def test_bytes_moved():
    # 2-bit weights 2048 * 2048 / 4, int8 x 2048, one fp32 scale, fp32 y 2048
    assert gpu.packed_kernel_bytes(1, 2048, 2048) == 1_048_576 + 2048 + 4 + 8192
    # K = 130 pads to 256: 10 rows of 64 bytes, x 256, scale 4, y 40
    assert gpu.packed_kernel_bytes(1, 10, 130) == 640 + 256 + 4 + 40
    assert gpu.packed_kernel_bytes(3, 10, 128) == 320 + 384 + 12 + 120
    assert gpu.bf16_matmul_bytes(1, 2048, 2048) == 2 * (4_194_304 + 2048 + 2048)


def test_bandwidth_fraction_and_speedup():
    assert gpu.bandwidth_fraction(4.8e9, 1e-3) == pytest.approx(1.0)
    assert gpu.bandwidth_fraction(1_058_820, 0.5e-6) == pytest.approx(2.11764e12 / 4.8e12)
    assert gpu.bandwidth_fraction(4.3e9, 1e-3, peak_bytes_per_s=4.3e12) == pytest.approx(1.0)
    assert gpu.speedup(3e-6, 1.5e-6) == pytest.approx(2.0)
    assert gpu.H200_HBM_BYTES_PER_S == 4.8e12 and gpu.H200_BF16_DENSE_FLOPS == 989e12


def test_mfu_arithmetic():
    assert gpu.train_flops_per_token(1_000_000_000) == 6e9
    # PaLM's attention term: 12 * 16 layers * 2048 * 2048 = 805,306,368 per token
    assert gpu.train_flops_per_token(1_000_000_000, 16, 2048, 2048) == 6e9 + 805_306_368
    # 6e9 FLOP/token at 100k tokens/s = 6e14 FLOP/s over 989e12
    assert gpu.mfu(6e9, 1e5) == pytest.approx(0.606673, rel=1e-5)
    assert gpu.mfu(6e9, 1e5, peak_flops=6e14) == pytest.approx(1.0)


def test_rotation_copies():
    l2 = 60 * 2**20
    assert gpu.rotation_copies(2**20, l2) == 240  # a 1 MiB packed attn_out: 240 copies = 4x L2
    assert gpu.rotation_copies(2 * 16384 * 2048, l2) == 4  # 64 MiB bf16 ff_proj
    assert gpu.rotation_copies(10 * l2, l2) == 1
    assert gpu.rotation_copies(1, l2) == 512  # capped


def test_ulp_distance():
    one = torch.tensor([1.0])
    assert int(gpu.ulp_distance(one, torch.nextafter(one, torch.tensor([2.0])))) == 1
    two_up = torch.nextafter(torch.nextafter(one, torch.tensor([2.0])), torch.tensor([2.0]))
    assert int(gpu.ulp_distance(two_up, one)) == 2
    assert int(gpu.ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0]))) == 0
    tiny = torch.tensor([1.401298464324817e-45])  # the smallest subnormal
    assert int(gpu.ulp_distance(tiny, -tiny)) == 2
    x = torch.randn(100)
    assert int(gpu.ulp_distance(x, x.clone()).max()) == 0


def test_shapes_follow_the_1b_preset():
    from model.presets import PRESETS

    llm, source = gpu.preset_llm()
    assert source == "model.presets" and llm == PRESETS["1b"].llm
    assert gpu.FALLBACK_1B_LLM == PRESETS["1b"].llm
    assert gpu.llm_linear_shapes(2048, 8 * 2048) == {
        "att_proj": (6144, 2048), "attn_out": (2048, 2048), "ff_proj": (16384, 2048), "ff_out": (2048, 8192)}


def test_version_problem_reads_pyproject():
    assert gpu.required_spec("transformers").startswith("transformers>=")
    assert gpu.version_problem("transformers", "5.24.0", None) is None
    assert "5.17.0 found" in gpu.version_problem("transformers", "5.17.0", None)
    assert "does not import" in gpu.version_problem("transformers", None, "ImportError: x")


# ---- the kernel check's verdicts (the reference standing in for the kernel) ------------------------

SMALL = {"a": (40, 130), "b": (17, 256)}


def test_check_kernel_passes_the_reference():
    from model.packed.kernels.reference import ternary_linear_reference

    out = gpu.check_kernel(ternary_linear_reference, SMALL, (1, 3, 17), "cpu")
    assert out["check_ok"] and out["check_integer_exact"] and out["check_bitwise_identical"]
    assert out["check_cases"] == 6 and out["check_max_ulps"] == 0 and out["check_bitwise_fraction"] == 1.0


def test_check_kernel_tolerates_approximate_division_but_not_wrong_dots():
    from model.packed.kernels.reference import ternary_linear_reference

    def one_ulp_off(x, xs, w, ws):  # what div.full.f32 may do: exact dots, the quotient 1 ulp up
        y = ternary_linear_reference(x.cpu(), xs.cpu(), w.cpu(), ws)
        return y if ws == 1.0 else torch.nextafter(y, torch.full_like(y, math.inf))

    out = gpu.check_kernel(one_ulp_off, SMALL, (1, 3), "cpu")
    assert out["check_ok"] and out["check_max_ulps"] == 1 and not out["check_bitwise_identical"]

    def wrong_dot(x, xs, w, ws):
        y = ternary_linear_reference(x.cpu(), xs.cpu(), w.cpu(), ws)
        y[0, 0] += 1.0
        return y

    out = gpu.check_kernel(wrong_dot, SMALL, (1,), "cpu")
    assert not out["check_ok"] and not out["check_integer_exact"] and len(out["check_failures"]) == 2


# ---- the training step, tiny, on CPU ---------------------------------------------------------------

def test_train_step_bench_tiny_cpu():
    from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM

    config = OLMoBitNetConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=100, embedding_size=128,
                              max_sequence_length=64, eos_token_id=0, pad_token_id=1)
    out = gpu.train_step_bench(config, batch=2, seq=16, steps=2, device="cpu", dtype=torch.bfloat16, warmup=1)
    assert out["train_tokens_per_step"] == 32 and out["train_dtype"] == "bfloat16"
    assert out["train_params"] == sum(p.numel() for p in OLMoBitNetForCausalLM(config).parameters())
    assert out["train_loss_finite"] and out["train_tokens_per_s"] > 0
    assert out["train_tokens_per_s"] == pytest.approx(32 / out["train_step_s"], rel=1e-2)


# ---- main()'s assembly of the line, with the CUDA parts faked -------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    props = types.SimpleNamespace(major=9, minor=0, multi_processor_count=132, total_memory=143 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu, "nvidia_smi", lambda: {"driver": "580.159.04"})
    env = {"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "triton": "3.6.0",
           "transformers": "5.24.0"}
    monkeypatch.setattr(gpu, "environment", lambda torch_module, do_import=True: dict(env))
    monkeypatch.setattr(gpu, "triton_kernel", lambda: None)
    monkeypatch.setattr(gpu, "measure_ceilings", lambda t, d: {"measured_copy_TBps": 4.3, "_copy_bps": 4.3e12,
                                                                "_mm_flops": 7.9e14})
    monkeypatch.setattr(gpu, "check_kernel", lambda *a: {"check_ok": True, "check_max_ulps": 1})
    monkeypatch.setattr(gpu, "check_packed_path", lambda *a: {"path_check_ok": True})
    seen = {}

    def time_kernels(torch_module, shapes, ms, device, n_layers, copy_bps, replays, seed):
        seen["time"] = (dict(shapes), tuple(ms), n_layers, copy_bps)
        return {"triton_vs_cublas_bf16_m1": 5.1, "triton_hbm_fraction_m1": 0.6}

    def train_section(torch_module, llm, args, device, mm_flops):
        seen["train"] = (llm["d_model"], args.train_batch, mm_flops)
        return {"train_tokens_per_s": 30000.0, "mfu": 0.21}

    monkeypatch.setattr(gpu, "time_kernels", time_kernels)
    monkeypatch.setattr(gpu, "train_section", train_section)
    return env, seen


def test_main_assembles_one_line(fake_gpu, tmp_path, capsys):
    env, seen = fake_gpu
    out_file = tmp_path / "gpu.json"
    assert gpu.main(["--out", str(out_file)]) == 0
    stdout = capsys.readouterr().out
    assert len(stdout.strip().splitlines()) == 1
    line = json.loads(stdout)
    assert json.loads(out_file.read_text()) == line
    assert line["benchmark"] == "gpu" and line["device"] == "NVIDIA H200" and line["capability"] == "9.0"
    assert line["torch"] == env["torch"] and line["triton"] == "3.6.0" and line["driver"] == "580.159.04"
    assert line["ok"] is True and line["errors"] == {} and line["missing"] == []
    assert line["triton_vs_cublas_bf16_m1"] == 5.1 and line["mfu"] == 0.21 and line["check_ok"] is True
    assert "_copy_bps" not in line and "partial" not in line
    assert line["shapes"]["ff_proj"] == [16384, 2048] and line["n_layers"] == 16
    assert seen["time"][1] == gpu.TIME_MS and seen["time"][3] == 4.3e12  # measured copy bandwidth passed on
    assert seen["train"] == (2048, 4, 7.9e14)
    for section in gpu.SECTIONS:
        assert f"{section}_seconds" in line


def test_main_reports_failures_and_missing_packages(fake_gpu, monkeypatch, capsys):
    env, _ = fake_gpu
    env["transformers"] = "5.17.0"

    def broken(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu, "time_kernels", broken)
    assert gpu.main(["--sections", "check,time,train"]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["ok"] is False and line["check_ok"] is True
    assert line["errors"]["time"] == "RuntimeError: boom"
    assert line["errors"]["train"].startswith("skipped: transformers 5.17.0 found")
    assert any("5.17.0" in m for m in line["missing"])


def test_main_skips_sections_past_the_deadline(fake_gpu, capsys):
    assert gpu.main(["--deadline-s", "-1", "--sections", "check"]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["errors"]["check"].startswith("skipped:") and "check_ok" not in line


def test_main_prints_a_line_when_cuda_fails_at_start(fake_gpu, monkeypatch, capsys):
    def no_device(d):
        raise RuntimeError("CUDA error: no device")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_device)
    assert gpu.main([]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["benchmark"] == "gpu" and line["ok"] is False and "no device" in line["fatal"]
