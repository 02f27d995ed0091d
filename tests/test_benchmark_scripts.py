"""benchmarks/prefill.py and benchmarks/request.py run end to end on the tiny preset (the 1b runs are
benchmarks, not tests): one JSON line with the CPU's features, the kernel path and the named ratios."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_prefill_and_request_benchmarks_on_the_tiny_preset(tmp_path, packed_dir):
    from components.pack import PackConfig, run_pack

    llm = str(tmp_path / "tiny-llm")
    run_pack(PackConfig(out=llm, preset="tiny", llm_only=True, format="2bit"))
    line = run_script("prefill.py", "--packed", llm, "--tokens", "40", "--repeats", "1",
                      "--variants", "packed", "dense_bf16")
    assert line["kernel"]["gemm_path"] in line["kernel"]["gemm_paths"] and line["kernel"]["gemm_min_rows"] <= 40
    assert "avx2" in line["cpu_features"]
    assert line["prefill_40_packed_tok_s"] > 0 and line["prefill_40_packed_vs_dense_bf16"] > 0

    line = run_script("request.py", "--packed", packed_dir, "--repeats", "1", "--concurrency", "2", "--no-http")
    assert line["packed_ttft_s"] <= line["packed_total_latency_s"]
    assert line["ttft_packed_vs_dense_bf16"] > 0 and line["total_latency_packed_vs_dense_bf16"] > 0
    assert line["packed_requests_per_s_at_2"] > 0 and line["prompt_tokens"] > 16
