"""Throughput and latency of the Serve endpoint on the `tiny` packed model, over real HTTP on loopback.

Prints one JSON line. A local Ray cluster (--cpus logical CPUs) runs the application of
serve/app.py (one ChatIngress, --replicas BitLlavaModel replicas, float32 on CPU); closed-loop
clients (aiohttp, one event loop in this process) send streamed chat completions back to back:
one 64 px PNG as a base64 data URL plus a short question, `max_tokens` new tokens with
`ignore_eos` (every request generates the same number of tokens, so requests/s are comparable).

For each concurrency level (--concurrency): requests/s, output tokens/s, latency p50/p95 (request
to `data: [DONE]`) and time to first token p50/p95 (request to the first content chunk), after a
warm-up round. The run is repeated with the engine's batching off (max_batch_size 1: requests to
a replica run one at a time) to show what continuous batching buys.

The clients share the machine with the server (2 cores on the development machines), so the
numbers are a lower bound of what the server alone would do.

Usage: python benchmarks/serve.py [--packed FOLDER] [--concurrency 1 4 16] [--requests-per-client 6]
       [--max-tokens 32] [--replicas 1] [--cpus 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time

MODEL_NAME = "bitllava-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="red")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def one_request(session, url: str, body: dict) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed request."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return time.perf_counter() - started, first if first is not None else float("nan"), tokens


async def run_level(url: str, body: dict, concurrency: int, per_client: int) -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(one_request(session, url, body) for _ in range(concurrency)))  # warm-up round
        results: list[tuple[float, float, int]] = []

        async def client():
            for _ in range(per_client):
                results.append(await one_request(session, url, body))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies = [r[0] for r in results]
    ttfts = [r[1] for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "requests_per_s": round(len(results) / elapsed, 3),
        "output_tokens_per_s": round(sum(r[2] for r in results) / elapsed, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 4),
        "latency_p95_s": round(percentile(latencies, 0.95), 4),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 4),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 4),
    }


def deploy(packed: str, max_batch_size: int, replicas: int, max_ongoing: int) -> None:
    from ray import serve

    from serve.app import make_app
    from serve.settings import ServeSettings

    settings = ServeSettings.from_args({
        "model": packed, "model_name": MODEL_NAME,
        "engine": {"dtype": "float32", "max_batch_size": max_batch_size, "batch_wait_ms": 2},
    })
    deployments = {
        "ChatIngress": {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.25}},
        "BitLlavaModel": {"num_replicas": replicas, "max_ongoing_requests": max_ongoing,
                          "ray_actor_options": {"num_cpus": 0.5}},
    }
    serve.run(make_app(settings, deployments), name="bench", route_prefix="/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packed", default=None, help="packed model folder (default: pack the tiny preset)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size 1 comparison")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from model.packed.packed_checkpoint import save_packed
    from model.presets import build_from_preset

    workdir = tempfile.mkdtemp(prefix="bench-serve-")
    packed = args.packed
    if packed is None:
        packed = os.path.join(workdir, "packed-tiny")
        save_packed(packed, *build_from_preset("tiny", seed=0))

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url()}},
                {"type": "text", "text": "What color is the circle?"}]}]}
    top = max(args.concurrency)
    runs = {"batched": max(16, top)} if args.no_unbatched else {"batched": max(16, top), "unbatched": 1}
    out: dict = {"benchmark": "serve", "model": "tiny packed (2-bit)", "device": "cpu",
                 "cpu": platform.processor() or platform.machine(), "ray_cpus": args.cpus,
                 "torch_threads": torch.get_num_threads(), "replicas": args.replicas,
                 "max_tokens": args.max_tokens, "images_per_request": 1, "transport": "HTTP SSE on loopback"}
    try:
        for name, max_batch in runs.items():
            deploy(packed, max_batch, args.replicas, max_ongoing=max(16, top))
            levels = [asyncio.run(run_level(url, body, c, args.requests_per_client)) for c in args.concurrency]
            out[name] = {"max_batch_size": max_batch, "levels": levels}
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    batched = {lvl["concurrency"]: lvl for lvl in out["batched"]["levels"]}
    out["ttft_s"] = {"concurrency_1_p50": batched[min(batched)]["ttft_p50_s"],
                     f"concurrency_{top}_p50": batched[top]["ttft_p50_s"]}
    if "unbatched" in out:
        unbatched = {lvl["concurrency"]: lvl for lvl in out["unbatched"]["levels"]}
        out["batching_speedup_at_max_concurrency"] = round(
            batched[top]["requests_per_s"] / unbatched[top]["requests_per_s"], 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
