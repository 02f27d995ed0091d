"""`make bench`: run every benchmark in this folder, collect their JSON lines into results.json and
a Markdown table (results.md). Each benchmark prints one JSON line as its last line of output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# gpu.py prints a "skipped" line at once on machines without CUDA
BENCHMARKS = ["preprocess.py", "train.py", "decode.py", "prefill.py", "request.py", "serve.py", "gpu.py"]


def main() -> None:
    results = {}
    for name in BENCHMARKS:
        start = time.time()
        proc = subprocess.run([sys.executable, os.path.join(HERE, name)], capture_output=True, text=True)
        lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[name] = {"error": (proc.stderr or proc.stdout)[-500:]}
        else:
            results[name] = json.loads(lines[-1])
        results[name]["wall_seconds"] = round(time.time() - start, 1)
        print(f"[bench] {name}: {json.dumps(results[name])}", flush=True)
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    rows = ["| benchmark | metric | value |", "|---|---|---|"]
    for name, result in results.items():
        for key, value in result.items():
            if not isinstance(value, dict):
                rows.append(f"| {name} | {key} | {value} |")
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print(f"[bench] wrote {HERE}/results.json and results.md")


if __name__ == "__main__":
    main()
