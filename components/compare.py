"""`bitllava runs compare`: the params that differ and the final metrics of several MLflow runs,
plus one PNG overlaying their loss curves."""

from __future__ import annotations

import os

from mlflow.tracking import MlflowClient


def compare_runs(run_ids: list[str], experiment: str = "bitllava", tracking_uri: str | None = None,
                 png: str = "runs_compare.png", metric: str = "loss") -> dict:
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ValueError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    if not runs:
        raise ValueError("no runs to compare")
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    metric_keys = sorted({k for r in runs for k in r.data.metrics if not k.startswith("system/")})
    header = ["run", "name"] + differing + metric_keys
    rows = [[r.info.run_id[:8], r.data.tags.get("mlflow.runName", "")]
            + [r.data.params.get(k, "") for k in differing]
            + [f"{r.data.metrics[k]:.4g}" if k in r.data.metrics else "" for k in metric_keys] for r in runs]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header] + rows]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for r in runs:
        history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history],
                    label=f"{r.data.tags.get('mlflow.runName', '')} {r.info.run_id[:8]}")
            plotted += 1
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} of {plotted} runs")
    if plotted:
        ax.legend(fontsize=7)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"table": "\n".join(lines), "png": png, "runs": [r.info.run_id for r in runs], "differing": differing,
            "curves": plotted}
