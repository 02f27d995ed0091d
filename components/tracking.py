"""MLflow helpers shared by the pipeline steps: tracking URI, phase runs, run comparison.

The driver creates each step's run (nested under a pipeline run when given) and logs its config;
the rank-0 worker then resumes that run by id to log metrics, so a restarted worker keeps logging
to the same run.
"""

from __future__ import annotations

import os
import subprocess

from mlflow.tracking import MlflowClient

from components import storage


def resolve_tracking_uri(configured: str | None, out: str) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else a sqlite store in the (local) output folder."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = os.path.abspath(out) if not storage.is_s3(out) else os.path.abspath("mlruns")
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def create_run(tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
               params: dict | None = None, tags: dict | None = None) -> str:
    """Create a run (nested when parent_run_id is given), log params and tags, leave it to be resumed by id."""
    # an explicit client only: mlflow.set_tracking_uri would also set $MLFLOW_TRACKING_URI for every later
    # run in this process (a stopped server then broke the next run's default store)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
    all_tags = {"mlflow.runName": run_name, "git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name)
    for key, value in flatten(params or {}).items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id
