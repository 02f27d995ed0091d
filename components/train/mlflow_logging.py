"""Rank-0 MLflow logging of one training phase (the run itself is created by the driver)."""

from __future__ import annotations

import os

import mlflow
from mlflow.tracking import MlflowClient

MODEL_ARTIFACT_LIMIT = 200 * 2**20  # larger final models are referenced by URI, not copied into MLflow


class PhaseLogger:
    def __init__(self, run_id: str, cfg):
        self.run_id, self.cfg = run_id, cfg

    def start(self, counts: dict, ds_config: dict, resumed_at: int) -> None:
        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
        mlflow.log_params(counts)
        mlflow.log_dict(ds_config, "deepspeed_config.json")
        mlflow.log_dict(self.cfg.to_dict(), "train_config.yaml")
        if resumed_at:
            mlflow.set_tag(f"resumed_at_step_{resumed_at}", "true")

    def log_epoch(self, epoch: int, used: int, dropped: int, world: int) -> None:
        """Samples this epoch trains on (across all ranks) and drops at its end; MLflow step = epoch."""
        mlflow.log_metrics({"samples_per_epoch": float(used), "samples_dropped_per_epoch": float(dropped)}, step=epoch)
        print(f"[train] epoch {epoch}: {used} samples on {world} ranks, {dropped} dropped", flush=True)

    def log_step(self, metrics: dict) -> None:
        step = int(metrics["step"])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "step"}, step=step)
        print("[train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()), flush=True)

    def finish(self, final_dir: str, metrics: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        history = MlflowClient(self.cfg.tracking_uri).get_metric_history(self.run_id, "loss")
        steps = [m.step for m in sorted(history, key=lambda m: m.step)]
        values = [m.value for m in sorted(history, key=lambda m: m.step)]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values)
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"{self.cfg.phase} loss")
        mlflow.log_figure(fig, "loss_curve.png")
        plt.close(fig)
        mlflow.set_tag("model_uri", final_dir)
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(final_dir) for f in fs) \
            if os.path.isdir(final_dir) else None
        if size is not None and size <= MODEL_ARTIFACT_LIMIT:
            mlflow.log_artifacts(final_dir, "model")
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items() if k != "step"})
        mlflow.end_run()
