"""GPU benchmark (one H200 call, under 8 minutes, nothing downloaded, random weights): the Triton
ternary kernel against the reference and against bf16 cuBLAS at the 1b LLM's linear shapes, and one
training step of the 1b LLM in bf16. Prints one JSON line; without a CUDA device it prints
`{"benchmark": "gpu", "skipped": "no CUDA device", ...}` and exits 0.

Sections (`--sections`, all by default):
- ceilings: the card's own ceilings, measured once (METHOD.md): a 1 GiB device-to-device copy
  (bytes read + written) and an 8192^3 bf16 matmul on random data.
- check: `model.packed.kernels.triton_ternary.ternary_linear_triton` against
  `model.packed.kernels.reference.ternary_linear_reference` (computed on the CPU, where it defines the
  function) at the four block shapes of the 1b LLM (att_proj 2048->6144, attn_out 2048->2048,
  ff_proj 2048->16384, ff_out 8192->2048) and M = 1, 3, 16, 17, 600, fresh random inputs each:
  (a) with unit scales the output is the exact integer dot, and must be bit-identical;
  (b) with random scales the distance to the reference is reported in float32 ulps (Triton's `/`
  on float32 is `div.full.f32`, within 2 ulps of IEEE division, so a bitwise match is reported,
  not required); (c) the whole CUDA path of PackedBitLinear (rms_norm -> int8 -> kernel,
  `model.packed.kernels.ternary_linear_normed`) with backend "triton" against backend "reference".
- time: the same shapes at M = 1, 16 and 600: the Triton kernel (int8 activations already
  quantised) against bf16 cuBLAS (`torch.matmul(x_bf16, w_bf16.T)`). Each timing is a CUDA graph
  of many launches, replayed after a warm-up and timed with CUDA events (median of replays); the
  launches rotate over copies of the weight that together exceed the L2 cache 4 times, so M = 1
  reads weights from HBM as decode does. Reported per shape and summed over the four shapes; the
  ratio `triton_vs_cublas_bf16_m{M}` is cuBLAS time over Triton time (> 1: Triton faster).
  At M = 1 the bytes each kernel must move (weights, x, scales, y) over its time give
  `*_hbm_fraction_m1`, of the datasheet HBM bandwidth and of the measured copy bandwidth.
- train: one training step (forward, backward, fused AdamW) of the 1b preset's LLM
  (`model.backbones.olmo_bitnet.OLMoBitNetForCausalLM` with `model.presets.PRESETS["1b"].llm`, BitLinear158
  blocks, vocab 50280 / embedding 50304), bf16 parameters, random weights and tokens, batch x seq
  tokens (halved on out-of-memory). LLM only: in phase 2 the CLIP tower is frozen (forward-only
  work, no trainable parameters) and the projector holds 6M of 1.18B parameters, so the
  trainable-parameter FLOPs are the LLM's. Reports tokens/s and MFU = 6 * params * tokens/s over
  the dense bf16 peak (and the same with PaLM's attention term, 12 * layers * d_model * seq).

Ceilings used (NVIDIA H200 SXM datasheet, as /work/.library/device/H200.md gives them): HBM3e
4.8 TB/s; dense bf16 989 TFLOP/s (the H100 SXM figure, 989.4; H200.md: "about 990"). MFU is also
given against the measured 8192^3 matmul rate.

Exit status: 0 when every section ran and the checks passed (or no GPU: skipped); 1 when a check
failed or a section raised (the JSON line says which); 2 with `--require-gpu` and no CUDA device.

On the device machine (python3 there holds torch and triton, but transformers 5.17, older than the
model's >=5.24): first, here, `bash benchmarks/gpu.sh --prepare` downloads the transformers and regex
wheels of requirements.lock into `.whl/` (ignored via .git/info/exclude); then pass to the device
`run` tool

    command: bash benchmarks/gpu.sh     carry: [".whl"]     timeout_s: 540

gpu.sh installs the wheels into /tmp/site (no network), prints nvidia-smi, runs this script with
`--require-gpu --out $OUT/gpu.json` and a 470 s timeout. Without the wheels the kernel sections
still run and the train section reports what is missing.

    python benchmarks/gpu.py [--sections ceilings,check,time,train] [--quick] [--out FILE]
                             [--train-batch 4] [--train-seq 2048] [--train-steps 5] [--require-gpu]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the project is not installed on the device machine

H200_HBM_BYTES_PER_S = 4.8e12  # H200.md: 141 GB HBM3e at 4.8 TB/s (vendor datasheet)
H200_BF16_DENSE_FLOPS = 989e12  # H100/H200 SXM datasheet, dense bf16 (H200.md: "about 990 TFLOP/s")
PEAK_SOURCE = ("NVIDIA H200 SXM datasheet via /work/.library/device/H200.md: HBM3e 4.8 TB/s, "
               "dense bf16 989 TFLOP/s")
SECTIONS = ("ceilings", "check", "time", "train")
CHECK_MS = (1, 3, 16, 17, 600)
TIME_MS = (1, 16, 600)
MAX_ULPS = 2  # div.full.f32 is within 2 ulps of IEEE division
# The 1b LLM's block shapes as DESIGN.md section 3 gives them; used only if model.presets cannot be
# imported (it needs transformers); tests/test_gpu_benchmark.py checks they equal the preset.
FALLBACK_1B_LLM = dict(d_model=2048, n_heads=16, n_layers=16, mlp_ratio=8, max_sequence_length=2048)


# ---------------------------------------------------------------------------------------------
# Pure arithmetic (tested on CPU)

def llm_linear_shapes(d_model: int, mlp_hidden: int) -> dict[str, tuple[int, int]]:
    """(N, K) = (out, in) of each BitLinear of one OLMo-Bitnet block."""
    return {
        "att_proj": (3 * d_model, d_model),
        "attn_out": (d_model, d_model),
        "ff_proj": (mlp_hidden, d_model),
        "ff_out": (d_model, mlp_hidden // 2),
    }


def packed_kernel_bytes(m: int, n: int, k: int) -> int:
    """Fewest bytes the packed kernel moves: 2-bit weights (K padded to 128), int8 x, fp32 x scales, fp32 y."""
    kp = -(-k // 128) * 128
    return n * kp // 4 + m * kp + 4 * m + 4 * m * n


def bf16_matmul_bytes(m: int, n: int, k: int) -> int:
    """Fewest bytes a bf16 (M, K) @ (K, N) moves: weight, x and y once each."""
    return 2 * (n * k + m * k + m * n)


def bandwidth_fraction(nbytes: float, seconds: float, peak_bytes_per_s: float = H200_HBM_BYTES_PER_S) -> float:
    """Achieved bytes/s over a peak bandwidth."""
    return nbytes / seconds / peak_bytes_per_s


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float = H200_BF16_DENSE_FLOPS) -> float:
    """Model FLOPs utilisation: flops_per_token * tokens/s over the peak rate."""
    return flops_per_token * tokens_per_s / peak_flops


def train_flops_per_token(params: int, n_layers: int = 0, d_model: int = 0, seq: int = 0) -> float:
    """6 * params (forward + backward of every weight), plus PaLM's attention term 12 * L * d * seq if given."""
    return 6.0 * params + 12.0 * n_layers * d_model * seq


def speedup(baseline_s: float, candidate_s: float) -> float:
    """How many times faster the candidate is than the baseline (> 1: faster)."""
    return baseline_s / candidate_s


def rotation_copies(nbytes: int, l2_bytes: int, factor: int = 4, cap: int = 512) -> int:
    """Copies of a weight to rotate over so that together they exceed `factor` times the L2 cache."""
    return max(1, min(cap, math.ceil(factor * l2_bytes / max(nbytes, 1))))


def ulp_distance(a, b):
    """Elementwise distance in float32 ulps between two float32 tensors (int64; +0 and -0 are 0 apart)."""
    import torch

    def key(t):
        i = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (key(a.float()) - key(b.float())).abs()


def parse_sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: M = 1, 16 in the check, fewer replays, 2 train steps of batch 1 x 512")
    parser.add_argument("--train-batch", type=int, default=4, help="sequences per training step (halved on OOM)")
    parser.add_argument("--train-seq", type=int, default=2048, help="tokens per sequence (the 1b preset's max_length)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--deadline-s", type=float, default=420.0,
                        help="skip sections that would start after this many seconds (default 420)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON line here (rewritten after each section)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 instead of 0 when no CUDA device is present")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("train_batch", "train_seq", "train_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.quick:
        args.train_batch, args.train_seq, args.train_steps = min(args.train_batch, 1), min(args.train_seq, 512), 2
    return args


def log(msg: str) -> None:
    print(f"[gpu] {msg}", file=sys.stderr, flush=True)


def emit(line: dict, out: str | None) -> str:
    """The JSON text of `line`, also written to `out` when given."""
    text = json.dumps(line)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


# ---------------------------------------------------------------------------------------------
# Environment

def module_version(name: str, do_import: bool = True) -> tuple[str | None, str | None]:
    """(version, None) or (None, why it does not import); without `do_import`, the installed metadata only."""
    try:
        if not do_import:
            from importlib.metadata import version

            return version(name), None
        return getattr(importlib.import_module(name), "__version__", "unknown"), None
    except Exception as exc:  # ImportError, or a dependency-version check raising at import
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def required_spec(package: str) -> str | None:
    """The version range pyproject.toml gives `package` (e.g. 'transformers>=5.24,<5.25')."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        return None
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    for dep in deps:
        name = dep.split(";")[0].strip()
        base = name.split("[")[0]
        for op in ("<", ">", "=", "!", "~"):
            base = base.split(op)[0]
        if base.strip().lower() == package:
            return name
    return None


def version_problem(package: str, found: str | None, why: str | None) -> str | None:
    """None if `found` satisfies pyproject.toml's range for `package`, else a sentence a user can act on."""
    spec = required_spec(package)
    if found is None:
        return f"{package} does not import ({why}); needs {spec or package}"
    if spec is None:
        return None
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return None
    if Requirement(spec).specifier.contains(found, prereleases=True):
        return None
    return f"{package} {found} found; the model needs {spec} (pyproject.toml): run `bash benchmarks/gpu.sh --prepare` here and carry .whl"


def nvidia_smi() -> dict:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"nvidia_smi": f"unavailable ({type(exc).__name__})"}
    if proc.returncode:
        return {"nvidia_smi": f"rc {proc.returncode}"}
    fields = [f.strip() for f in proc.stdout.strip().splitlines()[0].split(",")]
    keys = ("driver", "sm_clock_before", "mem_clock_before", "temperature_before", "power_before")
    return dict(zip(keys, fields))


def environment(torch, do_import: bool = True) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        info[name], why = module_version(name, do_import)
        if why:
            info[f"{name}_import_error"] = why
    return info


def preset_llm() -> tuple[dict, str]:
    """The 1b preset's LLM fields and where they came from."""
    try:
        from model.presets import PRESETS

        return dict(PRESETS["1b"].llm), "model.presets"
    except Exception as exc:
        return dict(FALLBACK_1B_LLM), f"DESIGN.md section 3 (model.presets did not import: {type(exc).__name__})"


# ---------------------------------------------------------------------------------------------
# Section: kernel check (device-agnostic; on CPU the tests pass the reference as the kernel)

def check_kernel(kernel, shapes: dict[str, tuple[int, int]], ms, device, seed: int = 0) -> dict:
    """Compare kernel(x, x_scale, w, w_scale) with the reference (on the CPU) on fresh random inputs."""
    import torch

    from model.packed.kernels.reference import ternary_linear_reference
    from model.packed.packing import pack_2bit, padded_row_length

    gen = torch.Generator().manual_seed(seed)
    out = {"check_cases": 0, "check_integer_exact": True, "check_max_ulps": 0, "check_bitwise_fraction": 0.0,
           "check_failures": []}
    same, total = 0, 0
    for name, (n, k) in shapes.items():
        codes = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        w_cpu = pack_2bit(codes).data  # (N, Kp / 4)
        w = w_cpu.to(device)
        kp = padded_row_length(k)
        for m in ms:
            x = torch.randint(-128, 128, (m, kp), generator=gen, dtype=torch.int8)
            x[:, k:] = 0  # zeros past K, as ternary_linear_normed pads
            ones = torch.ones(m)
            y_int = kernel(x.to(device), ones.to(device), w, 1.0).cpu()
            int_ok = torch.equal(y_int, ternary_linear_reference(x, ones, w_cpu, 1.0))
            x_scale = torch.empty(m).uniform_(0.5, 300.0, generator=gen)  # s_x = 127 / max|x_n|
            w_scale = float(torch.empty((), dtype=torch.float32).uniform_(1.0, 100.0, generator=gen))
            y = kernel(x.to(device), x_scale.to(device), w, w_scale).cpu()
            ref = ternary_linear_reference(x, x_scale, w_cpu, w_scale)
            finite = bool(torch.isfinite(y).all())
            ulps = int(ulp_distance(y, ref).max()) if finite else -1
            out["check_cases"] += 1
            same += int((y == ref).sum())
            total += ref.numel()
            out["check_max_ulps"] = max(out["check_max_ulps"], ulps)
            if not int_ok:
                out["check_integer_exact"] = False
            if not int_ok or not finite or ulps > MAX_ULPS:
                out["check_failures"].append(f"{name} M={m}: integer_exact={int_ok} finite={finite} max_ulps={ulps}")
    out["check_bitwise_fraction"] = round(same / max(total, 1), 6)
    out["check_bitwise_identical"] = same == total
    out["check_ok"] = not out["check_failures"]
    return out


def check_packed_path(shapes, device, seed: int = 0, m: int = 16) -> dict:
    """PackedBitLinear's CUDA path (rms_norm -> int8 -> kernel) with backend "triton" against "reference"."""
    import torch

    from model.bitlinear import rms_norm
    from model.packed.kernels import ternary_linear_normed
    from model.packed.packing import pack_2bit

    gen = torch.Generator().manual_seed(seed + 1)
    worst, failures = 0, []
    for name, (n, k) in shapes.items():
        w = pack_2bit(torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)).data.to(device)
        x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
        x_n = rms_norm(x, 1e-5)
        y = ternary_linear_normed(x_n, w, 31.25, "triton").cpu()
        ref = ternary_linear_normed(x_n, w, 31.25, "reference").cpu()
        ulps = int(ulp_distance(y, ref).max()) if bool(torch.isfinite(y).all()) else -1
        worst = max(worst, ulps)
        if ulps < 0 or ulps > MAX_ULPS:
            failures.append(f"{name}: max_ulps={ulps}")
    return {"path_check_m": m, "path_check_max_ulps": worst, "path_check_ok": not failures,
            "path_check_failures": failures}


# ---------------------------------------------------------------------------------------------
# Sections needing CUDA

def _events_ms(torch, fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return times


def measure_ceilings(torch, device) -> dict:
    """Copy bandwidth (1 GiB, bytes read + written) and an 8192^3 bf16 matmul on random data."""
    a = torch.rand(2**28, device=device)  # 1 GiB of float32
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    copy_ms = statistics.median(_events_ms(torch, lambda: b.copy_(a), 10))
    del a, b
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(x, y)
    mm_ms = statistics.median(_events_ms(torch, lambda: torch.matmul(x, y), 10))
    del x, y
    torch.cuda.empty_cache()
    copy_bps = 2 * 2**30 / (copy_ms / 1e3)
    mm_flops = 2 * 8192**3 / (mm_ms / 1e3)
    return {"measured_copy_TBps": round(copy_bps / 1e12, 3), "measured_bf16_matmul_TFLOPs": round(mm_flops / 1e12, 1),
            "measured_copy_vs_datasheet": round(copy_bps / H200_HBM_BYTES_PER_S, 3),
            "measured_matmul_vs_datasheet": round(mm_flops / H200_BF16_DENSE_FLOPS, 3),
            "_copy_bps": copy_bps, "_mm_flops": mm_flops}


def time_launches(torch, calls, replays: int = 10, target_replay_s: float = 2e-3, max_replay_s: float = 0.2):
    """Median seconds per call of `calls` (zero-arg callables, rotated), from a CUDA graph of many launches.

    Returns (seconds, mode); mode is "cuda_graph" or "eager_events" when capture fails."""
    for fn in calls:  # warm-up: Triton JIT, cuBLAS handles and workspaces
        fn()
    torch.cuda.synchronize()
    probe = statistics.median(_events_ms(torch, lambda: [fn() for fn in calls[:4]], 3)) / 1e3 / min(4, len(calls))
    launches = max(len(calls), math.ceil(target_replay_s / max(probe, 1e-7)))
    launches = min(launches, 4096, max(3, int(max_replay_s / max(probe, 1e-7))))
    seq = [calls[i % len(calls)] for i in range(launches)]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in calls:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in seq:
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = _events_ms(torch, graph.replay, replays)
        mode = "cuda_graph"
        del graph
    except Exception as exc:  # capture unsupported: eager launches (includes launch overhead)
        log(f"graph capture failed ({type(exc).__name__}: {exc}); timing eager launches")
        times = _events_ms(torch, lambda: [fn() for fn in seq], replays)
        mode = "eager_events"
    return statistics.median(times) / 1e3 / launches, mode


def random_packed(torch, n: int, k: int, device, gen) -> "torch.Tensor":
    """Random valid 2-bit rows (every digit in {0, 1, 2}) made on the device: uint8 (N, Kp / 4)."""
    kp = -(-k // 128) * 128
    d = torch.randint(0, 3, (n, kp // 4, 4), device=device, generator=gen, dtype=torch.uint8)
    return (d[..., 0] | (d[..., 1] << 2) | (d[..., 2] << 4) | (d[..., 3] << 6)).contiguous()


def triton_kernel():
    """`ternary_linear_triton` (importing it needs triton)."""
    from model.packed.kernels.triton_ternary import ternary_linear_triton

    return ternary_linear_triton


def time_kernels(torch, shapes, ms, device, n_layers: int, copy_bps: float | None, replays: int, seed: int) -> dict:
    ternary_linear_triton = triton_kernel()
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {"l2_bytes": l2, "time_ms_list": list(ms)}
    totals = {m: {"triton": 0.0, "cublas": 0.0, "triton_bytes": 0, "cublas_bytes": 0} for m in ms}
    modes = set()
    for name, (n, k) in shapes.items():
        kp = -(-k // 128) * 128
        w0 = random_packed(torch, n, k, device, gen)
        wb0 = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        packed = [w0] + [w0.clone() for _ in range(rotation_copies(w0.numel(), l2) - 1)]
        dense = [wb0] + [wb0.clone() for _ in range(rotation_copies(wb0.numel() * 2, l2) - 1)]
        out[f"{name}_rotation_copies_triton_cublas"] = f"{len(packed)}/{len(dense)}"
        for m in ms:
            x = torch.randint(-128, 128, (m, kp), device=device, generator=gen, dtype=torch.int8)
            xs = torch.rand(m, device=device, generator=gen) * 100 + 1
            xb = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
            t_tri, mode1 = time_launches(torch, [lambda w=w: ternary_linear_triton(x, xs, w, 31.25) for w in packed],
                                         replays)
            t_cub, mode2 = time_launches(torch, [lambda w=w: torch.matmul(xb, w.T) for w in dense], replays)
            modes.update((mode1, mode2))
            b_tri, b_cub = packed_kernel_bytes(m, n, k), bf16_matmul_bytes(m, n, k)
            out[f"{name}_m{m}_triton_us"] = round(t_tri * 1e6, 2)
            out[f"{name}_m{m}_cublas_bf16_us"] = round(t_cub * 1e6, 2)
            out[f"{name}_triton_vs_cublas_bf16_m{m}"] = round(speedup(t_cub, t_tri), 3)
            if m == 1:
                out[f"{name}_m1_triton_GBps"] = round(b_tri / t_tri / 1e9, 1)
                out[f"{name}_m1_cublas_bf16_GBps"] = round(b_cub / t_cub / 1e9, 1)
            tot = totals[m]
            tot["triton"] += t_tri
            tot["cublas"] += t_cub
            tot["triton_bytes"] += b_tri
            tot["cublas_bytes"] += b_cub
            log(f"time {name} M={m}: triton {t_tri * 1e6:.2f} us, cublas bf16 {t_cub * 1e6:.2f} us ({mode1}/{mode2})")
        del packed, dense, w0, wb0
        torch.cuda.empty_cache()
    for m, tot in totals.items():
        # one block = the four linears; the LLM's linears per token step = n_layers blocks
        out[f"llm_linears_m{m}_triton_ms"] = round(n_layers * tot["triton"] * 1e3, 4)
        out[f"llm_linears_m{m}_cublas_bf16_ms"] = round(n_layers * tot["cublas"] * 1e3, 4)
        out[f"triton_vs_cublas_bf16_m{m}"] = round(speedup(tot["cublas"], tot["triton"]), 3)
    if 1 in totals:
        tot = totals[1]
        out["triton_hbm_fraction_m1"] = round(bandwidth_fraction(tot["triton_bytes"], tot["triton"]), 4)
        out["cublas_bf16_hbm_fraction_m1"] = round(bandwidth_fraction(tot["cublas_bytes"], tot["cublas"]), 4)
        if copy_bps:
            out["triton_measured_copy_fraction_m1"] = round(bandwidth_fraction(tot["triton_bytes"], tot["triton"], copy_bps), 4)
            out["cublas_bf16_measured_copy_fraction_m1"] = round(
                bandwidth_fraction(tot["cublas_bytes"], tot["cublas"], copy_bps), 4)
    out["timing_mode"] = "/".join(sorted(modes))
    return out


# ---------------------------------------------------------------------------------------------
# Section: training step (device-agnostic; tested on CPU with a tiny config)

def train_step_bench(config, batch: int, seq: int, steps: int, device, dtype, warmup: int = 2, seed: int = 0) -> dict:
    """Forward + backward + AdamW on random tokens; median seconds per step after `warmup` steps."""
    import torch

    from model.backbones.olmo_bitnet import OLMoBitNetForCausalLM

    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(seed)
    with torch.device(device):
        model = OLMoBitNetForCausalLM(config)
    model.to(dtype).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.98), weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    ids = torch.randint(2, config.vocab_size, (batch, seq), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    out = {
        "train_batch": batch, "train_seq": seq, "train_tokens_per_step": batch * seq, "train_steps_timed": steps,
        "train_dtype": str(dtype).replace("torch.", ""), "train_params": params,
        "train_attn_implementation": getattr(config, "_attn_implementation", None),
        "train_step_s": round(step_s, 4), "train_tokens_per_s": round(tokens_per_s, 1),
        "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "train_loss_finite": all(math.isfinite(v) for v in losses),
    }
    if cuda:
        out["train_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del model, opt
    return out


def train_section(torch, llm: dict, args, device, mm_flops: float | None) -> dict:
    from model.backbones.olmo_bitnet import OLMoBitNetConfig

    config = OLMoBitNetConfig(**llm)  # vocab 50280 / embedding 50304: the config's defaults (DESIGN.md section 3)
    batch = args.train_batch
    while True:
        try:
            result = train_step_bench(config, batch, args.train_seq, args.train_steps, device, torch.bfloat16,
                                      seed=args.seed)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            log(f"train: out of memory at batch {batch}; halving")
        gc.collect()  # the failed attempt's model and optimizer, freed with its traceback
        torch.cuda.empty_cache()
        batch //= 2
    tps = result["train_tokens_per_s"]
    flops_6n = train_flops_per_token(result["train_params"])
    flops_attn = train_flops_per_token(result["train_params"], config.n_layers, config.d_model, args.train_seq)
    result.update(
        train_vocab_size=config.vocab_size, train_embedding_size=config.embedding_size,
        train_flops_per_token_6n=flops_6n,
        mfu=round(mfu(flops_6n, tps), 4),
        mfu_with_attention=round(mfu(flops_attn, tps), 4),
        mfu_peak_flops=H200_BF16_DENSE_FLOPS,
    )
    if mm_flops:
        result["mfu_vs_measured_matmul"] = round(mfu(flops_6n, tps, mm_flops), 4)
    return result


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    line: dict = {"benchmark": "gpu"}
    try:
        import torch
    except ImportError as exc:
        line.update(skipped=f"torch does not import ({exc})", python=platform.python_version())
        print(emit(line, args.out))
        return 2 if args.require_gpu else 0
    if not torch.cuda.is_available():
        line.update(skipped="no CUDA device", **environment(torch, do_import=False), cuda_available=False)
        print(emit(line, args.out))
        return 2 if args.require_gpu else 0
    try:
        return run_on_gpu(args, torch, line, start)
    except Exception as exc:  # e.g. the CUDA runtime failing before any section: still one JSON line
        traceback.print_exc()
        line.update(fatal=f"{type(exc).__name__}: {exc}"[:500], ok=False)
        print(emit(line, args.out))
        return 1


def run_on_gpu(args, torch, line: dict, start: float) -> int:
    """The sections, in order, each recorded in `line` (or in its `errors`); prints the line."""
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference path's float32 matmul must stay exact
    props = torch.cuda.get_device_properties(device)
    line.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                **environment(torch), **nvidia_smi(), peak_source=PEAK_SOURCE,
                peak_hbm_bytes_per_s=H200_HBM_BYTES_PER_S, peak_bf16_flops=H200_BF16_DENSE_FLOPS,
                sections=",".join(args.sections), quick=args.quick)
    llm, source = preset_llm()
    shapes = llm_linear_shapes(llm["d_model"], llm["mlp_ratio"] * llm["d_model"])
    line.update(shapes_from=source, shapes={k: list(v) for k, v in shapes.items()}, n_layers=llm["n_layers"])
    missing: list[str] = []
    if line.get("triton") is None:
        missing.append(f"triton ({line.get('triton_import_error')})")
    problem = version_problem("transformers", line.get("transformers"), line.get("transformers_import_error"))
    if problem:
        missing.append(problem)
    line["missing"] = missing
    errors: dict[str, str] = {}
    copy_bps = mm_flops = None
    replays = 5 if args.quick else 10

    for section in args.sections:
        elapsed = time.monotonic() - start
        if elapsed > args.deadline_s:
            errors[section] = f"skipped: {elapsed:.0f} s elapsed > --deadline-s {args.deadline_s:.0f}"
            continue
        if section in ("check", "time") and line.get("triton") is None:
            errors[section] = "skipped: triton does not import"
            continue
        if section == "train" and problem:
            errors[section] = f"skipped: {problem}"
            continue
        log(f"section {section} at {elapsed:.1f} s")
        t0 = time.monotonic()
        try:
            if section == "ceilings":
                result = measure_ceilings(torch, device)
                copy_bps, mm_flops = result.pop("_copy_bps"), result.pop("_mm_flops")
            elif section == "check":
                ms = (1, 16) if args.quick else CHECK_MS
                result = {"check_ms_list": list(ms), **check_kernel(triton_kernel(), shapes, ms, device, args.seed),
                          **check_packed_path(shapes, device, args.seed)}
            elif section == "time":
                result = time_kernels(torch, shapes, TIME_MS, device, llm["n_layers"], copy_bps, replays, args.seed)
            else:
                result = train_section(torch, llm, args, device, mm_flops)
        except Exception as exc:
            traceback.print_exc()
            errors[section] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"section {section} failed: {errors[section]}")
            torch.cuda.empty_cache()
            continue
        finally:
            line[f"{section}_seconds"] = round(time.monotonic() - t0, 1)
        line.update(result)
        emit({**line, "errors": errors, "partial": True}, args.out)
    line["errors"] = errors
    line["total_seconds"] = round(time.monotonic() - start, 1)
    failed = bool(errors) or line.get("check_ok") is False or line.get("path_check_ok") is False
    line["ok"] = not failed
    print(emit(line, args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
