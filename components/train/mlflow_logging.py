"""Rank-0 MLflow logging of one training phase (the run itself is created by the driver)."""

from __future__ import annotations

import os

from mlflow.tracking import MlflowClient

MODEL_ARTIFACT_LIMIT = 200 * 2**20  # larger final models are referenced by URI, not copied into MLflow


class PhaseLogger:
    """Metrics, params and tags go through an Outbox (components.tracking_outbox): a step never waits on the
    tracking server, an outage is buffered and sent when it answers again, and what is still unsent at the end
    is kept in a local file with the command that replays it."""

    def __init__(self, run_id: str, cfg):
        self.run_id, self.cfg = run_id, cfg
        self.losses: dict[int, float] = {}  # this attempt's loss curve, for when the server is away at the end

    def start(self, counts: dict, ds_config: dict, resumed_at: int) -> None:
        from components.tracking_outbox import Outbox, SystemMetrics, unsent_file

        self.outbox = Outbox(self.cfg.tracking_uri, self.run_id, *unsent_file(self.cfg.out, self.run_id))
        self.system = SystemMetrics(self.outbox)
        self.outbox.log_params(counts)
        if resumed_at:
            self.outbox.set_tags({f"resumed_at_step_{resumed_at}": "true"})
        try:  # the configs are also in the run's params (logged by the driver)
            client = MlflowClient(self.cfg.tracking_uri)
            client.log_dict(self.run_id, ds_config, "deepspeed_config.json")
            client.log_dict(self.run_id, self.cfg.to_dict(), "train_config.yaml")
        except Exception as err:
            print(f"[mlflow] config artifacts not logged ({str(err)[:200]})", flush=True)

    def log_epoch(self, epoch: int, used: int, dropped: int, world: int) -> None:
        """Samples this epoch trains on (across all ranks) and drops at its end; MLflow step = epoch."""
        self.outbox.log_metrics({"samples_per_epoch": float(used), "samples_dropped_per_epoch": float(dropped)},
                                step=epoch)
        print(f"[train] epoch {epoch}: {used} samples on {world} ranks, {dropped} dropped", flush=True)

    def log_step(self, metrics: dict) -> None:
        step = int(metrics["step"])
        self.outbox.log_metrics({k: float(v) for k, v in metrics.items() if k != "step"}, step=step)
        self.losses[step] = float(metrics["loss"])
        print("[train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()), flush=True)

    def fail(self) -> None:
        """The run stopped with an error no restart fixes: its metrics delivered (or kept), status FAILED."""
        self.system.stop()
        self.outbox.set_terminated("FAILED")
        self.outbox.close()

    def finish(self, final_dir: str, metrics: dict) -> None:
        self.system.stop()
        self.outbox.log_metrics({f"final_{k}": float(v) for k, v in metrics.items() if k != "step"})
        self.outbox.set_tags({"model_uri": final_dir})
        self.outbox.set_terminated("FINISHED")
        delivery = self.outbox.close()
        if delivery.file:  # the server is away: artifacts stay local, the model is at final_dir anyway
            self._plot(self.losses).savefig(os.path.join(os.path.dirname(delivery.file),
                                                         f"{self.run_id}-loss_curve.png"))
            print(f"[train] MLflow run {self.run_id} is incomplete: {delivery.unsent} values were not logged; "
                  f"`{delivery.replay_command()}` sends them", flush=True)
            return
        try:
            client = MlflowClient(self.cfg.tracking_uri)
            history = {m.step: m.value for m in client.get_metric_history(self.run_id, "loss")}
            client.log_figure(self.run_id, self._plot(history), "loss_curve.png")
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(final_dir) for f in fs) \
                if os.path.isdir(final_dir) else None
            if size is not None and size <= MODEL_ARTIFACT_LIMIT:
                client.log_artifacts(self.run_id, final_dir, "model")
        except Exception as err:  # the server went away after the metrics: the run's numbers are in
            print(f"[train] loss curve / model artifacts not logged to MLflow ({str(err)[:200]}); "
                  f"the model is at {final_dir}", flush=True)

    def _plot(self, history: dict):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = sorted(history)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [history[s] for s in steps])
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"{self.cfg.phase} loss")
        plt.close(fig)  # log_figure and savefig work on a closed figure
        return fig
