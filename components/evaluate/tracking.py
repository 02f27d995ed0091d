"""MLflow runs of evaluations: one run per task, nested under a pipeline run when its id is given.

Uses `MlflowClient` with an explicit tracking URI (no process-wide `mlflow.set_tracking_uri`), so
several stores can be used from one process. Nesting is MLflow's own convention: the child run
carries the tag `mlflow.parentRunId` and lives in the parent's experiment.
"""

from __future__ import annotations

import os
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
    out_dir: str | None = None  # where metrics the server could not take are kept (`<out_dir>/mlflow-unsent/`)

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
    """Parameters, metrics (one step) and files or folders (`{local path: artifact folder}`).

    Through `components.tracking_outbox.log_or_keep`: with the tracking server away, the metrics and
    parameters wait in `<out_dir>/mlflow-unsent/` for `bitllava runs replay` and the files stay in out_dir
    (the evaluation itself is never lost to an outage)."""
    from components.tracking_outbox import log_or_keep

    delivery = log_or_keep(run.tracking_uri, run.run_id, run.out_dir or ".", metrics=metrics,
                           params={k: str(v)[:PARAM_VALUE_LIMIT] for k, v in params.items()})
    if delivery.file:
        print(f"[eval] MLflow away: the results stay in {run.out_dir}; {delivery.replay_command()}", flush=True)
        return
    try:
        for path, folder in artifacts.items():
            if os.path.isdir(path):  # a result folder (MME's eval_tool layout) keeps its name
                run.client.log_artifacts(run.run_id, path, artifact_path=f"{folder}/{os.path.basename(path)}")
            else:
                run.client.log_artifact(run.run_id, path, artifact_path=folder)
    except Exception as err:  # noqa: BLE001 - the files are in out_dir either way
        print(f"[eval] could not upload the result files to MLflow ({type(err).__name__}: {err}); "
              f"they are in {run.out_dir}", flush=True)


def end_run(run: TrackedRun, ok: bool) -> None:
    from components.tracking_outbox import log_or_keep

    log_or_keep(run.tracking_uri, run.run_id, run.out_dir or ".", status="FINISHED" if ok else "FAILED")
