"""Batch-1 decode speed of the 1b LLM: packed ternary kernels against dense bf16 and fp32 PyTorch.

Prints one JSON line. Every variant runs in its own subprocess (so its resident memory is its
own) on the same weights: the `1b` preset's language model (OLMo-Bitnet-1B shapes) with random
ternary weights, packed once by `components.pack` (or a folder given with --packed).

Variants:
- packed: PackedBitLinear blocks (2-bit codes, the AVX2 kernel on CPU), bf16 elsewhere, the tied
  head from the bf16 embedding (the AVX2 bf16 head kernel);
- packed_int8_head: the same with the int8 head (`model.packed.packed_model.Int8Head`);
- dense_bf16 / dense_fp32: the same function in plain PyTorch (F.linear everywhere, the head
  included): each block linear holds its ternary weight materialised once as a dense matrix
  (codes / s_w) and runs rms_norm -> int8 fake-quantised activations -> F.linear, as
  BitLinear158 does after quantising its weight (the dense baselines skip re-quantising the
  latent weight every step, which would only make them slower).

Decode: a prompt of --prompt-tokens random ids is prefilled, then --new-tokens greedy steps run
with the KV cache; tokens/s is new tokens over the decode time (prefill excluded), the best of
--repeats runs (the median is reported too). All variants stay loaded in their own processes and
take turns, one decode each per round, so load from other processes on a shared machine falls on
all of them alike; resident memory is each process's RSS after decoding.

Usage: python benchmarks/decode.py [--packed FOLDER] [--new-tokens 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("packed", "packed_int8_head", "dense_bf16", "dense_fp32")


class DenseTernaryLinear(nn.Module):
    """BitLinear158's forward with its weight quantised once: w_q = codes / s_w as a dense matrix."""

    def __init__(self, w_q: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(w_q, requires_grad=False)  # (out, in)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from model.bitlinear import quantize_activations, rms_norm

        x_n = rms_norm(x, self.eps)
        return F.linear(quantize_activations(x_n), self.weight)


def build_variant(folder: str, variant: str):
    from model.packed.packed_checkpoint import load_packed
    from model.packed.packed_linear import PackedBitLinear

    if variant.startswith("packed"):
        return load_packed(folder, dtype=torch.bfloat16, head="int8" if variant == "packed_int8_head" else "dense").model
    dtype = torch.bfloat16 if variant == "dense_bf16" else torch.float32
    model = load_packed(folder, dtype=dtype, backend="reference").model
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, PackedBitLinear)]:
        w_q = module.codes().to(dtype) / torch.tensor(module.scale, dtype=dtype)
        model.set_submodule(name, DenseTernaryLinear(w_q, module.eps))
    return model


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@torch.no_grad()
def decode_once(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    from transformers import DynamicCache

    out = model(prompt, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)  # (1, 1)
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    return time.perf_counter() - start, tokens


def run_worker(args) -> None:
    """Load one variant, then answer each line on stdin with one timed decode (a JSON line)."""
    start = time.perf_counter()
    model = build_variant(args.packed, args.variant).eval()
    load_s = time.perf_counter() - start
    prompt = torch.randint(2, 50000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    decode_once(model, prompt, 2)  # warm-up: kernel load, allocator, caches
    print(json.dumps({"ready": True, "load_s": load_s, "rss_bytes": rss_bytes()}), flush=True)
    for _ in sys.stdin:
        seconds = decode_once(model, prompt, args.new_tokens)[0]
        print(json.dumps({"seconds": seconds, "rss_bytes": rss_bytes()}), flush=True)


def measure(folder: str, args) -> dict:
    """All variants loaded at once in their own processes; decodes interleaved round by round, so a
    burst of load from other processes on a shared machine hits every variant alike."""
    workers = {}
    try:
        for variant in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--packed", folder,
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            ready = proc.stdout.readline()
            if not ready:
                raise RuntimeError(f"the {variant} worker exited (rc {proc.wait()})")
            workers[variant] = (proc, json.loads(ready), [])
        for _ in range(args.repeats):
            for variant, (proc, _, times) in workers.items():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                reply = proc.stdout.readline()
                if not reply:
                    raise RuntimeError(f"the {variant} worker exited (rc {proc.wait()})")
                times.append(json.loads(reply))
    finally:
        for proc, _, _ in workers.values():
            proc.stdin.close()
            proc.wait()
    results = {}
    for variant, (_, ready, runs) in workers.items():
        seconds = [r["seconds"] for r in runs]
        results[variant] = {
            "tok_s": args.new_tokens / min(seconds),
            "tok_s_median": args.new_tokens / statistics.median(seconds),
            "rss_bytes": max(r["rss_bytes"] for r in runs),
            "load_s": ready["load_s"],
        }
    return results


def pack_llm(folder: str) -> dict:
    from components.pack import PackConfig, run_pack

    return run_pack(PackConfig(out=folder, preset="1b", llm_only=True, format="2bit"))


def gpu_kernel_bench() -> dict:
    """The Triton kernel against bf16 cuBLAS on the 1b block shapes at batch 1 (CUDA machines only)."""
    from model.packed.kernels import triton_available

    if not triton_available():
        return {"gpu": "unavailable (no CUDA device or no triton)"}
    from model.packed.kernels.triton_ternary import ternary_linear_triton
    from model.packed.packing import pack_2bit

    dev = torch.device("cuda")
    shapes = {"att_proj": (6144, 2048), "attn_out": (2048, 2048), "ff_proj": (16384, 2048), "ff_out": (2048, 8192)}
    out = {"gpu": torch.cuda.get_device_name(dev)}
    total_packed, total_dense = 0.0, 0.0
    for name, (n, k) in shapes.items():
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
        w = pack_2bit(codes).data.to(dev)
        w_bf16 = codes.to(dev, torch.bfloat16)
        x = torch.randint(-128, 128, (1, k), dtype=torch.int8, device=dev)
        xs = torch.ones(1, device=dev)
        xb = x.to(torch.bfloat16)
        assert torch.equal(ternary_linear_triton(x, xs, w, 1.0).cpu(), (x.float() @ codes.to(dev).float().T).cpu())

        def timed(fn, reps=200):
            fn()
            torch.cuda.synchronize()
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return begin.elapsed_time(end) / reps / 1e3  # seconds

        t_packed = timed(lambda: ternary_linear_triton(x, xs, w, 1.0))
        t_dense = timed(lambda: F.linear(xb, w_bf16))
        out[f"{name}_triton_us"] = round(t_packed * 1e6, 2)
        out[f"{name}_cublas_bf16_us"] = round(t_dense * 1e6, 2)
        out[f"{name}_triton_GBps"] = round(w.numel() / t_packed / 1e9, 1)
        out[f"{name}_cublas_bf16_GBps"] = round(2 * n * k / t_dense / 1e9, 1)
        total_packed += 16 * t_packed
        total_dense += 16 * t_dense
    out["blocks_speedup_vs_cublas_bf16"] = round(total_dense / total_packed, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packed", default=None, help="packed 1b LLM folder (default: pack one into a temp folder)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", dest="variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant is not None:
        run_worker(args)
        return 0

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bitllava-decode-") as tmp:
        folder = args.packed
        pack_report = None
        if folder is None:
            folder = os.path.join(tmp, "1b-llm-2bit")
            pack_report = pack_llm(folder)
        results = measure(folder, args)

    from model.packed.kernels import resolve_backend

    line = {
        "benchmark": "decode batch 1, 1b LLM (OLMo-Bitnet-1B shapes, random ternary weights)",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "kernel": resolve_backend(torch.device("cpu"), "auto"),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if pack_report is not None:
        line["packed_folder_bytes"] = pack_report["folder_bytes"]
        line["bf16_bytes"] = pack_report["bf16_bytes"]
    for variant, r in results.items():
        line[f"{variant}_tok_s"] = round(r["tok_s"], 2)
        line[f"{variant}_tok_s_median"] = round(r["tok_s_median"], 2)
        line[f"{variant}_rss_bytes"] = r["rss_bytes"]
    for base in ("dense_bf16", "dense_fp32"):
        for fast in ("packed", "packed_int8_head"):
            if base in results and fast in results:
                line[f"speedup_{fast}_vs_{base}"] = round(results[fast]["tok_s"] / results[base]["tok_s"], 2)
    line.update(gpu_kernel_bench())
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
