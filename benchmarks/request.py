"""One image question end to end on the `1b` preset: packed ternary against the same model dense in bf16.

Prints one JSON line. The whole multimodal model of the `1b` preset (CLIP ViT-L/14-336 tower +
projector + the 1b LLM, random weights, packed once by `components.pack`) answers one 336-px
image question ("Describe the image.") with 32 new tokens (ignore_eos, greedy):

1. In process, through the serve engine (`serve.engine.BatchEngine`, what a replica runs), in
   one subprocess per variant taking turns round by round:
   - packed: the packed folder loaded as a Serve replica loads it with `dtype: auto`;
   - dense_bf16: the same weights with every ternary linear materialised as a dense bf16 matrix
     (benchmarks/decode.py's dense variant), tower and projector in bf16.
   Time to first token (request to the first generated token: tower, projector, prefill of
   ~600 positions) and total latency (32 tokens), the best of --repeats; then --concurrency
   requests at once (batched by the engine): requests/s.
2. Over HTTP: `bitllava serve --model PACKED` with the shipped Serve config, the same question
   streamed through /v1/chat/completions: the first request after start-up and the next ones.

Ratios: `ttft_packed_vs_dense_bf16`, `total_latency_packed_vs_dense_bf16` (below 1: packed is
faster), `http_ttft_vs_in_process` and `http_first_vs_later_ttft`.

Usage: python benchmarks/request.py [--packed FOLDER] [--repeats 3] [--concurrency 4] [--no-http]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import importlib.util

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks/serve.py would shadow the `serve` package: this folder off the path, siblings by file
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_variant = _sibling("decode").build_variant  # the dense bf16 variant of the same weights
cpu_features = _sibling("prefill").cpu_features

VARIANTS = ("packed", "dense_bf16")
QUESTION = "Describe the image."
NEW_TOKENS = 32


def question_image():
    """A 336 x 336 picture (shapes on a gradient), as a client would upload it."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((336, 336)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 180, 200), fill=(220, 40, 40))
    draw.rectangle((190, 150, 300, 300), fill=(40, 90, 220))
    return image


def load_variant(folder: str, variant: str):
    """(model, tokenizer, image processor) as a replica with dtype auto has it, or dense bf16."""
    from model.packed.packed_checkpoint import load_packed
    from model.precision import resolve_dtypes, set_vision_dtype

    loaded = load_packed(folder, dtype=torch.float32)  # tokenizer, processor and config
    if variant == "packed":
        llm_dtype, vision_dtype = resolve_dtypes("auto", torch.device("cpu"))
        if llm_dtype != torch.float32:
            loaded = load_packed(folder, dtype=llm_dtype)
        set_vision_dtype(loaded.model, vision_dtype)
        return loaded.model.eval(), loaded.tokenizer, loaded.image_processor
    return build_variant(folder, "dense_bf16").eval(), loaded.tokenizer, loaded.image_processor


def request_for(model, tokenizer, processor):
    from model.chat import user_turn
    from model.conversation import prompt_ids
    from model.vision import preprocess_images
    from serve.engine import GenerationRequest, SamplingParams

    config = model.config
    ids = prompt_ids([user_turn(QUESTION, 1)], tokenizer, config.template, 1, config.num_image_tokens)
    pixels = preprocess_images([question_image()], processor)
    return GenerationRequest(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True), pixels)


def run_requests(engine, requests) -> dict:
    """Submit all at once, step the engine to the end: per request TTFT and latency, and the wall time."""
    start = time.perf_counter()
    seqs = [engine.submit(r) for r in requests]
    first = {}
    while engine.has_work():
        for seq, event in engine.step():
            if event.error:
                raise RuntimeError(event.error)
            first.setdefault(id(seq), time.perf_counter())
    wall = time.perf_counter() - start
    assert all(len(s.generated) == NEW_TOKENS for s in seqs)
    return {"ttft_s": [first[id(s)] - start for s in seqs], "wall_s": wall,
            "prompt_tokens": seqs[0].prompt_tokens}


def run_worker(args) -> None:
    """Load one variant and its engine, then answer each stdin line ("1" or "N") with a timed run."""
    from serve.engine import BatchEngine

    torch.set_num_threads(args.threads)
    model, tokenizer, processor = load_variant(args.packed, args.variant)
    engine = BatchEngine(model, tokenizer, max_batch_size=8, max_prefill_tokens=16384)
    request = request_for(model, tokenizer, processor)
    run_requests(engine, [request])  # warm-up, as a replica warms up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_requests(engine, [request] * int(line))), flush=True)


def measure_in_process(folder: str, args) -> dict:
    workers, runs = {}, {v: {"single": [], "batch": []} for v in args.variants}
    try:
        for variant in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--packed", folder,
                   "--threads", str(args.threads)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if not proc.stdout.readline():
                raise RuntimeError(f"the {variant} worker exited (rc {proc.wait()})")
            workers[variant] = proc

        def ask(variant, n):
            proc = workers[variant]
            proc.stdin.write(f"{n}\n")
            proc.stdin.flush()
            reply = proc.stdout.readline()
            if not reply:
                raise RuntimeError(f"the {variant} worker exited (rc {proc.wait()})")
            return json.loads(reply)

        for _ in range(args.repeats):
            for variant in workers:
                runs[variant]["single"].append(ask(variant, 1))
        for variant in workers:
            runs[variant]["batch"].append(ask(variant, args.concurrency))
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    out = {}
    for variant, r in runs.items():
        out[f"{variant}_ttft_s"] = round(min(x["ttft_s"][0] for x in r["single"]), 3)
        out[f"{variant}_total_latency_s"] = round(min(x["wall_s"] for x in r["single"]), 3)
        out[f"{variant}_requests_per_s_at_{args.concurrency}"] = round(args.concurrency / r["batch"][0]["wall_s"], 3)
        out["prompt_tokens"] = r["single"][0]["prompt_tokens"]
    if set(VARIANTS) <= set(runs):
        out["ttft_packed_vs_dense_bf16"] = round(out["packed_ttft_s"] / out["dense_bf16_ttft_s"], 3)
        out["total_latency_packed_vs_dense_bf16"] = round(
            out["packed_total_latency_s"] / out["dense_bf16_total_latency_s"], 3)
        key = f"requests_per_s_at_{args.concurrency}"
        out[f"{key}_packed_vs_dense_bf16"] = round(out[f"packed_{key}"] / out[f"dense_bf16_{key}"], 3)
    return out


def measure_http(folder: str, repeats: int) -> dict:
    """`bitllava serve --model FOLDER` (shipped config, its own local Ray cluster), streamed requests."""
    import requests

    from serve.app import default_config_path

    port = free_port()
    buf = io.BytesIO()
    question_image().save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "bitllava", "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": QUESTION}]}]}
    bitllava = os.path.join(os.path.dirname(sys.executable), "bitllava")
    started = time.perf_counter()
    server = subprocess.Popen([bitllava, "serve", "--model", folder, "--config", default_config_path(),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        line = server.stdout.readline()  # the JSON line once every replica is up and warm
        if not line.startswith("{"):
            raise RuntimeError(f"bitllava serve did not start (rc {server.poll()})")
        ready_s = time.perf_counter() - started
        base = json.loads(line)["openai_base_url"]
        results = []
        with requests.Session() as client:
            for _ in range(1 + repeats):
                sent = time.perf_counter()
                first = None
                with client.post(f"{base}/chat/completions", json=body, stream=True, timeout=300) as reply:
                    reply.raise_for_status()
                    for chunk in reply.iter_lines(decode_unicode=True):
                        if first is None and chunk.startswith("data: {") and '"content":' in chunk:
                            first = time.perf_counter() - sent
                results.append((first, time.perf_counter() - sent))
    finally:
        import signal

        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    later = results[1:]
    return {"http_start_s": round(ready_s, 1), "http_first_ttft_s": round(results[0][0], 3),
            "http_first_total_latency_s": round(results[0][1], 3),
            "http_ttft_s": round(min(r[0] for r in later), 3),
            "http_total_latency_s": round(min(r[1] for r in later), 3),
            "http_first_vs_later_ttft": round(results[0][0] / min(r[0] for r in later), 3)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packed", default=None, help="packed 1b preset folder (default: pack one into a temp folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--no-http", action="store_true", help="skip the `bitllava serve` part")
    parser.add_argument("--worker", dest="variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant is not None:
        run_worker(args)
        return 0

    from model.packed.kernels.cpu import kernel_info
    from model.precision import resolve_dtypes

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bitllava-request-") as tmp:
        folder = args.packed
        if folder is None:
            from components.pack import PackConfig, run_pack

            folder = os.path.join(tmp, "1b-packed")
            run_pack(PackConfig(out=folder, preset="1b", format="2bit"))
        line = {"benchmark": "one 336-px image question, 32 new tokens, 1b preset (random weights)",
                **cpu_features(), "threads": args.threads, "kernel": kernel_info(),
                "packed_dtypes_auto": [str(d).removeprefix("torch.") for d in resolve_dtypes("auto", torch.device("cpu"))],
                "new_tokens": NEW_TOKENS, "concurrency": args.concurrency, "repeats": args.repeats}
        line.update(measure_in_process(folder, args))
        print(json.dumps(line), file=sys.stderr, flush=True)  # kept should the HTTP part fail
        if not args.no_http:
            line.update(measure_http(folder, args.repeats))
            if "packed_ttft_s" in line:
                line["http_ttft_vs_in_process"] = round(line["http_ttft_s"] / line["packed_ttft_s"], 3)
    line["load_avg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
