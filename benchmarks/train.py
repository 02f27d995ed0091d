"""Training-step cost of BitLinear158 (fake quantisation + STE) against nn.Linear of the same shapes,
and of gradient checkpointing (speed and peak memory). Prints one JSON line.

Each variant runs in a fresh subprocess (peak RSS is per process); all variants run in the same
invocation so the ratios compare like with like on a noisy machine.

    python benchmarks/train.py [--d-model 512] [--layers 4] [--seq 256] [--batch 4] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_variant(args) -> dict:
    import torch
    from torch import nn

    from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM

    torch.manual_seed(0)
    config = OLMoBitNetConfig(d_model=args.d_model, n_heads=args.d_model // 64, n_layers=args.layers,
                              vocab_size=4096, embedding_size=4096, max_sequence_length=args.seq,
                              eos_token_id=0, pad_token_id=1)
    model = OLMoBitNetForCausalLM(config)
    if args.variant == "linear":
        for block in model.model.transformer.blocks:
            for name in ("att_proj", "attn_out", "ff_proj", "ff_out"):
                old = getattr(block, name)
                new = nn.Linear(old.in_features, old.out_features, bias=False)
                new.weight.data.copy_(old.weight.data)
                setattr(block, name, new)
    if args.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (args.batch, args.seq))
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms allocators and kernels up
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {"tokens_per_s": args.batch * args.seq / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args)))
        return
    common = [f"--d-model={args.d_model}", f"--layers={args.layers}", f"--seq={args.seq}",
              f"--batch={args.batch}", f"--steps={args.steps}"]
    results = {}
    for name, extra in (("linear", ["--variant=linear"]), ("bitlinear", ["--variant=bitlinear"]),
                        ("bitlinear_ckpt", ["--variant=bitlinear", "--checkpointing"])):
        out = subprocess.run([sys.executable, __file__, *common, *extra], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "benchmark": "train_step_cpu",
        "shape": {"d_model": args.d_model, "layers": args.layers, "seq": args.seq, "batch": args.batch},
        "linear_tokens_per_s": round(results["linear"]["tokens_per_s"], 1),
        "bitlinear_tokens_per_s": round(results["bitlinear"]["tokens_per_s"], 1),
        "bitlinear_vs_linear_speed": round(results["bitlinear"]["tokens_per_s"] / results["linear"]["tokens_per_s"], 3),
        "checkpointing_tokens_per_s": round(results["bitlinear_ckpt"]["tokens_per_s"], 1),
        "checkpointing_vs_plain_speed": round(results["bitlinear_ckpt"]["tokens_per_s"]
                                              / results["bitlinear"]["tokens_per_s"], 3),
        "peak_rss_mb": {k: round(v["peak_rss_mb"]) for k, v in results.items()},
        "checkpointing_vs_plain_peak_rss": round(results["bitlinear_ckpt"]["peak_rss_mb"]
                                                 / results["bitlinear"]["peak_rss_mb"], 3),
        "gpu_1b_mfu": "not measured: no GPU was lent to this session",
    }))


if __name__ == "__main__":
    main()
