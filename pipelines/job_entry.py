"""Entry point of a job submitted with `bitllava submit`: `python -m pipelines.job_entry run CONFIG ...`.

Ray runs a job's entrypoint with the first `python` on the head node's PATH, which is not always the
interpreter the cluster runs in: `.venv/bin/ray start --head` without activating the venv leaves the
system Python first. This module imports only the standard library until it knows that the interpreter
holds the project's dependencies; if not, it re-executes itself with the interpreter of Ray's own
workers (read from the raylet's `--python_worker_command`), and if that is not possible either, it
ends with one line naming the fix.
"""

from __future__ import annotations

import os
import sys

REEXEC_FLAG = "BITLLAVA_JOB_REEXEC"
NEEDED = ("pyarrow", "ray", "torch", "transformers")


def missing_module() -> str | None:
    for name in NEEDED:
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def ray_worker_python(pid: int | None = None, depth: int = 8) -> str | None:
    """The interpreter in the raylet's `--python_worker_command`, found among this process's ancestors."""
    pid = os.getppid() if pid is None else pid
    for _ in range(depth):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        for arg in args:
            if arg.startswith("--python_worker_command="):
                return arg.split("=", 1)[1].split()[0] or None
        if parent <= 1:
            return None
        pid = parent
    return None


def main() -> int:
    missing = missing_module()
    if missing is None:
        from pipelines.cli import main as cli_main

        return cli_main(sys.argv[1:])
    python = ray_worker_python()
    if python and python != sys.executable and not os.environ.get(REEXEC_FLAG):
        os.environ[REEXEC_FLAG] = "1"
        os.execv(python, [python, "-m", "pipelines.job_entry", *sys.argv[1:]])
    print(f"bitllava job: the cluster's Python ({sys.executable}) has no {missing!r}: start the cluster from the "
          f"project's environment (`source .venv/bin/activate && ray start --head`) or run the project's image "
          f"(infra/Dockerfile)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
