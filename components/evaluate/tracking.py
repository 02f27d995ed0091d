"""MLflow runs of evaluations: one run per task, nested under a pipeline run when its id is given.

Uses `MlflowClient` with an explicit tracking URI (no process-wide `mlflow.set_tracking_uri`), so
several stores can be used from one process. Nesting is MLflow's own convention: the child run
carries the tag `mlflow.parentRunId` and lives in the parent's experiment.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a parameter value


def local_tracking_uri(out_dir: str) -> str:
    """The default store: a sqlite database inside the output folder."""
    return f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'mlflow.db'))}"


@dataclass
class TrackedRun:
    client: object  # mlflow.MlflowClient
    tracking_uri: str
    experiment_id: str
    run_id: str
    parent_run_id: str | None

    def as_dict(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "parent_run_id": self.parent_run_id}


def start_run(tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
              artifact_root: str | None = None) -> TrackedRun:
    """Create the run: in the parent's experiment when nested, else in `experiment` (created if new,
    with its artifacts under `artifact_root` when given)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    tags = {"mlflow.runName": run_name}
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as err:
            raise ValueError(
                f"MLflow parent run {parent_run_id} is not in the store {tracking_uri} ({err.message}); "
                f"pass the pipeline's store with --tracking-uri"
            ) from None
        experiment_id = parent.info.experiment_id
        tags["mlflow.parentRunId"] = parent_run_id
    else:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = Path(os.path.abspath(artifact_root)).as_uri() if artifact_root else None
            experiment_id = client.create_experiment(experiment, artifact_location=location)
    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
    return TrackedRun(client, tracking_uri, experiment_id, run.info.run_id, parent_run_id)


def log_results(run: TrackedRun, params: dict, metrics: dict[str, float], artifacts: dict[str, str]) -> None:
    """Parameters, metrics (one step) and files or folders (`{local path: artifact folder}`)."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    run.client.log_batch(
        run.run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()],
    )
    for path, folder in artifacts.items():
        if os.path.isdir(path):  # a result folder (MME's eval_tool layout) keeps its name
            run.client.log_artifacts(run.run_id, path, artifact_path=f"{folder}/{os.path.basename(path)}")
        else:
            run.client.log_artifact(run.run_id, path, artifact_path=folder)


def end_run(run: TrackedRun, ok: bool) -> None:
    run.client.set_terminated(run.run_id, status="FINISHED" if ok else "FAILED")
