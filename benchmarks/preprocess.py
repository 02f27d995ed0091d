"""Preprocessing throughput and memory: the Ray Data pipeline vs a plain single-process PIL loop.

Prints one JSON line. `pixels` mode on the `tiny` preset's image processor, CC-595K-style data:
- plain loop: decode + validate + pad-to-square + CLIP processor + template/tokenize, one process;
- Ray Data: `bitllava data preprocess` of 10 x N records on a local cluster of `--cpus` CPUs, per core =
  images/s / cpus, measured on a warm cluster (a first 10 x N run starts the worker processes and does
  their imports; its time is reported as `ray_seconds_10n_cold`) with nothing else sampling;
  `ray_marginal_*` is the steady-state rate, (10N - N records) / (10N time - N time), which leaves out
  the fixed start-up of a Ray Data execution (`ray_seconds_n` shows it on a small run);
- peak memory (RSS summed over the driver and every Ray worker process, sampled) for N and 10 x N
  records, in separate runs.

    python benchmarks/preprocess.py [--records 2000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from components.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from components.data.records import BadRecord, ImageSource, RecordProcessor  # noqa: E402
from components.data.synth import SynthConfig, synthesize  # noqa: E402
from model.presets import preset_config  # noqa: E402
from model.towers import build_image_processor  # noqa: E402


class PeakMemory:
    """Peak of the summed RSS of this process and all Ray worker processes, sampled every 250 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _sample(self):
        total = psutil.Process().memory_info().rss
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::"):  # idle workers too: they keep what they allocated
                    total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._sample())
                time.sleep(0.25)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plain_loop(summary: dict) -> tuple[int, float]:
    config, tokenizer = preset_config("tiny")
    proc = RecordProcessor(tokenizer, build_image_processor(config.vision_config), "plain",
                           config.num_image_tokens, 256)
    source = ImageSource(summary["images"])
    records = json.load(open(summary["json"]))
    start, done = time.perf_counter(), 0
    for idx, record in enumerate(records):
        try:
            proc.process_one(json.dumps(record), idx, source)
            done += 1
        except BadRecord:
            pass
    return done, time.perf_counter() - start


def ray_pipeline(summary: dict, out: str) -> tuple[int, float]:
    cfg = PreprocessConfig(source="cc595k", json=summary["json"], images=summary["images"], out=out,
                           phase="align", preset="tiny", shard_records=256)
    start = time.perf_counter()
    manifest = preprocess(cfg)
    return manifest["counts"]["samples"], time.perf_counter() - start


def peak_memory(summary: dict, out: str) -> int:
    with PeakMemory() as mem:
        ray_pipeline(summary, out)
    return mem.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    root = tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        small = synthesize(SynthConfig(out=os.path.join(root, "n"), records=args.records, eval=0))["cc595k"]
        large = synthesize(SynthConfig(out=os.path.join(root, "10n"), records=10 * args.records, eval=0))["cc595k"]
        plain_n, plain_s = plain_loop(large)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        _, cold_s = ray_pipeline(large, os.path.join(root, "warmup"))  # worker processes started, imports done
        n_small, s_small = ray_pipeline(small, os.path.join(root, "store-n"))
        n_large, s_large = ray_pipeline(large, os.path.join(root, "store-10n"))
        mem_small = peak_memory(small, os.path.join(root, "mem-n"))
        mem_large = peak_memory(large, os.path.join(root, "mem-10n"))
        ray.shutdown()
        plain_rate = plain_n / plain_s
        ray_rate_per_core = n_large / s_large / args.cpus
        marginal_per_core = (n_large - n_small) / (s_large - s_small) / args.cpus
        print(json.dumps({
            "benchmark": "preprocess_pixels_tiny",
            "records_n": args.records,
            "cpus": args.cpus,
            "plain_loop_images_per_s": round(plain_rate, 1),
            "ray_images_per_s": round(n_large / s_large, 1),
            "ray_images_per_s_per_core": round(ray_rate_per_core, 1),
            "ray_per_core_vs_plain": round(ray_rate_per_core / plain_rate, 3),
            "ray_marginal_images_per_s_per_core": round(marginal_per_core, 1),
            "ray_marginal_per_core_vs_plain": round(marginal_per_core / plain_rate, 3),
            "ray_seconds_n": round(s_small, 2),
            "ray_seconds_10n": round(s_large, 2),
            "ray_seconds_10n_cold": round(cold_s, 2),
            "peak_rss_mb_n": round(mem_small / 2**20),
            "peak_rss_mb_10n": round(mem_large / 2**20),
            "peak_rss_ratio_10n_vs_n": round(mem_large / mem_small, 3),
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
