"""Prefill speed of the 1b LLM (tokens/s through all layers): packed ternary against dense bf16 and fp32.

Prints one JSON line. A multimodal request is mostly prefill (576 image positions plus the
prompt), and prefill is compute-bound, so this measures the int8 GEMM path of the CPU kernel
(`model/packed/kernels/ternary_gemm.cpp`) where `decode.py` measures the batch-1 row kernel.

The variants are decode.py's (same weights, each in its own process, taking turns round by
round so load from other processes falls on all alike): packed (2-bit codes, bf16 activations
elsewhere), dense_bf16 and dense_fp32 (the ternary weights materialised once as dense matrices,
F.linear). One prefill = one forward of M random token ids with an empty KV cache and the head
on the last position only, as the serve engine prefills; tokens/s = M / the best of --repeats.

The line names the CPU's int8/bf16 features and the kernel path taken, and the ratios
`prefill_{M}_packed_vs_dense_bf16` / `_vs_dense_fp32`.

Usage: python benchmarks/prefill.py [--packed FOLDER] [--tokens 64 256 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _decode_module():
    """benchmarks/decode.py, loaded by file: this folder on sys.path would let serve.py shadow `serve`."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode.py")
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_decode = _decode_module()
build_variant, pack_llm, rss_bytes = _decode.build_variant, _decode.pack_llm, _decode.rss_bytes  # same variants

VARIANTS = ("packed", "dense_bf16", "dense_fp32")
FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_features() -> dict:
    """The CPU's model name and which of the int8 / bf16 instruction sets it reports (Linux)."""
    flags, name = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": name, "cpu_features": [f for f in FEATURES if f in flags]}


@torch.no_grad()
def prefill_once(model, ids: torch.Tensor) -> float:
    from transformers import DynamicCache

    start = time.perf_counter()
    model(ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def run_worker(args) -> None:
    """Load one variant, then answer each line "M" on stdin with one timed prefill (a JSON line)."""
    model = build_variant(args.packed, args.variant).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = min(50000, model.config.vocab_size)
    prompts = {m: torch.randint(2, vocab, (1, m), generator=generator) for m in args.tokens}
    for ids in prompts.values():
        prefill_once(model, ids[:, :8])  # warm-up: kernel load, thread pool, allocator
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        m = int(line)
        print(json.dumps({"seconds": prefill_once(model, prompts[m]), "rss_bytes": rss_bytes()}), flush=True)


def measure(folder: str, args) -> dict:
    workers = {}
    times = {(v, m): [] for v in args.variants for m in args.tokens}
    try:
        for variant in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--packed", folder,
                   "--tokens", *map(str, args.tokens)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if not proc.stdout.readline():
                raise RuntimeError(f"the {variant} worker exited (rc {proc.wait()})")
            workers[variant] = proc
        for _ in range(args.repeats):
            for m in args.tokens:
                for variant, proc in workers.items():
                    proc.stdin.write(f"{m}\n")
                    proc.stdin.flush()
                    reply = proc.stdout.readline()
                    if not reply:
                        raise RuntimeError(f"the {variant} worker exited (rc {proc.wait()})")
                    times[(variant, m)].append(json.loads(reply)["seconds"])
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    return times


def summarize(times: dict, tokens: list[int], variants: list[str]) -> dict:
    """tokens/s (best and median) per variant and M, and the packed-vs-dense ratios of the best."""
    line = {}
    for (variant, m), seconds in times.items():
        line[f"prefill_{m}_{variant}_tok_s"] = round(m / min(seconds), 1)
        line[f"prefill_{m}_{variant}_tok_s_median"] = round(m / statistics.median(seconds), 1)
    for m in tokens:
        for base in ("dense_bf16", "dense_fp32"):
            if "packed" in variants and base in variants:
                line[f"prefill_{m}_packed_vs_{base}"] = round(min(times[(base, m)]) / min(times[("packed", m)]), 2)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packed", default=None, help="packed 1b LLM folder (default: pack one into a temp folder)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 600], help="prefill lengths M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", dest="variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant is not None:
        run_worker(args)
        return 0

    from model.packed.kernels.cpu import kernel_info

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bitllava-prefill-") as tmp:
        folder = args.packed
        if folder is None:
            folder = os.path.join(tmp, "1b-llm-2bit")
            pack_llm(folder)
        times = measure(folder, args)
    line = {"benchmark": "prefill, 1b LLM (OLMo-Bitnet-1B shapes, random ternary weights)", **cpu_features(),
            "torch_threads": torch.get_num_threads(), "kernel": kernel_info(), "tokens": args.tokens,
            "repeats": args.repeats, "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    line.update(summarize(times, args.tokens, args.variants))
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
