"""Submit the pipeline to a Ray cluster through the Ray Jobs API, and follow it.

The job's runtime environment carries the project (its working directory, without local outputs
and the virtualenv); the cluster's nodes provide the dependencies (the project's image, see infra/).
"""

from __future__ import annotations

import os
import shlex
import sys

from components import storage
from pipelines.config import ROOT, load_pipeline_config

EXCLUDES = [".venv", ".git", "demo_out", "runs", "**/__pycache__", ".pytest_cache", "*.egg-info", "build"]


def _client(address: str):
    """A Jobs API client; a cluster that cannot be reached or refuses us is one line naming the fix."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise ValueError(f"the Ray cluster at {address} requires token authentication (RAY_AUTH_MODE is {mode}): "
                         f"set RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token, "
                         f"RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") from err
    except ConnectionError as err:
        raise ValueError(f"cannot reach the Ray dashboard at {address} ({str(err).splitlines()[0][:200]}): "
                         f"is the cluster up (`ray start --head`) and is this its dashboard address "
                         f"(default port 8265)?") from err


def submit(config: str, address: str, out: str | None = None, dry_run: bool = False, until: str | None = None) -> dict:
    load_pipeline_config(config, out=out)  # refuse a bad config before it reaches the cluster
    rel = os.path.relpath(os.path.abspath(config), ROOT)
    if rel.startswith(".."):
        raise ValueError(f"{config} must lie inside the project ({ROOT}) so that the job carries it")
    if out and not storage.is_s3(out) and not os.path.isabs(out):
        print(f"[submit] --out {out} is relative: it is resolved in the job's working directory on the "
              f"cluster, a temporary copy of the project; give an absolute path or an s3:// URI to keep "
              f"the outputs", file=sys.stderr)
    args = [rel] + (["--out", out] if out else []) + (["--dry-run"] if dry_run else []) + (
        ["--until", until] if until else [])
    # job_entry finds an interpreter that holds the project's dependencies (see its docstring)
    entrypoint = '"$(command -v python3 || command -v python)" -m pipelines.job_entry run ' + " ".join(
        shlex.quote(a) for a in args)
    import time

    client = _client(address)
    for attempt in range(30):  # a freshly started head answers "No available agent" for a few seconds
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": ROOT, "excludes": EXCLUDES,
                             "env_vars": {"PYTHONPATH": ".", "BITLLAVA_DEBUG": "1"}},
            )
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or attempt == 29:
                raise
            time.sleep(2)
    print(f"[submit] job {job_id} on {address}: {entrypoint}", file=sys.stderr)
    return {"job_id": job_id, "address": address, "entrypoint": entrypoint}


def wait_for_job(job_id: str, address: str, timeout_s: float = 1800) -> str:
    """Poll until the job ends; returns its final status name."""
    import time

    from ray.job_submission import JobStatus

    client, deadline = _client(address), time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still running after {timeout_s}s")


def job_status(job_id: str, address: str) -> dict:
    info = _client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status), "message": info.message,
            "entrypoint": info.entrypoint}


def job_logs(job_id: str, address: str, follow: bool = False) -> None:
    client = _client(address)
    if not follow:
        sys.stdout.write(client.get_job_logs(job_id))
        return
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
