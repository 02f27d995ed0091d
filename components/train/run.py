"""`bitllava train`: one phase on Ray Train + DeepSpeed, from the driver's side.

    TorchTrainer(train_loop, scaling_config=ScalingConfig(workers, use_gpu),
                 run_config=RunConfig(storage_path=out, failure_config=FailureConfig(max_failures)),
                 datasets={"train_<rank>": ...}, dataset_config=DataConfig(datasets_to_split=[]))

Each rank gets its own deterministic stream of store parts (see `components.train.data`), so the
datasets are not split again by Ray Train. The MLflow run is created here and resumed by rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time

from components import storage
from components.data.store import load_manifest
from components.console import VERBOSE_ENV
from components.tracking import create_run, resolve_tracking_uri
from components.tracking_outbox import unsent_left
from components.train.config import TrainConfig
from components.train.data import plan_epochs, rank_datasets
from components.train.step import NonFiniteStepsError, stop_file


def final_model_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.out, "model")


def check_init_model(init: str) -> None:
    """`init` must be a multimodal bitllava model folder with weights (what `bitllava model init` writes)."""
    from model.checkpoint import WEIGHT_FILES, read_config

    hint = "run `bitllava model init` (or the align phase, for instruct)"
    try:
        model_type = read_config(init).get("model_type")
    except ValueError as err:  # no config.json, or not JSON
        raise ValueError(f"--init {err}; {hint}") from err
    if model_type != "bitllava":
        raise ValueError(f"--init {init} holds a {model_type!r} model, not a multimodal bitllava model; {hint}")
    if not any(os.path.isfile(os.path.join(init, name)) for name in WEIGHT_FILES):
        raise ValueError(f"--init {init} holds no weights (looked for {', '.join(WEIGHT_FILES)})")


def check_tower_recipe(cfg: TrainConfig) -> None:
    """tune_vision_from_layer must name a layer that reaches the init model's features."""
    from model.checkpoint import read_config
    from model.towers import feature_depth

    if cfg.tune_vision != "partial":
        return
    raw = read_config(cfg.init)
    layers = raw["vision_config"]["num_hidden_layers"]
    depth = feature_depth(layers, raw.get("vision_feature_layer", -2))
    if cfg.tune_vision_from_layer >= depth:
        raise ValueError(f"tune_vision_from_layer {cfg.tune_vision_from_layer} trains no layer of {cfg.init}'s tower: "
                         f"its features come from the first {depth} of its {layers} layers")


def run_training(cfg: TrainConfig, address: str | None = None) -> dict:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Errors no restart can fix end the command here, in the driver, before any worker starts.
    check_init_model(cfg.init)
    check_tower_recipe(cfg)
    manifest = load_manifest(cfg.data)
    if manifest["phase"] != cfg.phase:
        raise ValueError(f"{cfg.data} was preprocessed for phase {manifest['phase']!r}, not {cfg.phase!r}")
    if cfg.trains_tower and manifest["encode"] != "pixels":
        raise ValueError(f"{cfg.data} holds cached tower features, which training the tower (tune_vision: "
                         f"{cfg.tune_vision}) makes stale: preprocess it with --encode pixels")
    plan = plan_epochs(manifest, cfg.workers, cfg.per_device_batch, cfg.grad_accum, cfg.epochs, cfg.seed)
    cfg.tracking_uri = resolve_tracking_uri(cfg.tracking_uri, cfg.out)
    run_id = create_run(cfg.tracking_uri, cfg.experiment, cfg.run_name or cfg.phase, cfg.parent_run_id,
                        params=cfg.to_dict(),
                        tags={"phase": cfg.phase, "dataset_content_hash": manifest["content_hash"],
                              "dataset_uri": cfg.data, "init": cfg.init})
    print(f"[train] {cfg.phase}: {manifest['counts']['samples']} samples, "
          f"{sum(e['micro_steps'] for e in plan) // cfg.grad_accum} optimizer steps planned, "
          f"MLflow run {run_id} at {cfg.tracking_uri}", file=sys.stderr, flush=True)

    if not ray.is_initialized():
        ray.init(address=address)
    env = {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "1")}
    # Ray Train's own storage operations (checkpoint registry, restores) retry through outages too
    fs, storage_path = storage.retrying_filesystem(storage.join(cfg.out, "ray"))
    trainer = TorchTrainer(
        train_loop_per_worker=_train_loop_entry,
        train_loop_config={"cfg": cfg.to_dict(), "plan": plan, "encode": manifest["encode"], "run_id": run_id,
                           "final_model_dir": final_model_dir(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=f"{cfg.phase}",
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env},
        ),
        datasets=rank_datasets(cfg.data, plan, cfg.workers),
        # each rank's stream is already its own; Ray Train must neither split nor reorder it
        dataset_config=DataConfig(datasets_to_split=[], execution_options=_ordered_ingest_options()),
    )
    start = time.time()
    with storage.surface_outage():  # a spent storage retry budget ends the run with its one-line error
        result = trainer.fit()
    if storage.exists(stop_file(cfg.out, run_id)):  # the workers stopped on non-finite steps (train loop)
        raise NonFiniteStepsError(json.loads(storage.read_bytes(stop_file(cfg.out, run_id)))["error"])
    summary = {
        "phase": cfg.phase,
        "model_dir": final_model_dir(cfg),
        "mlflow_run_id": run_id,
        "tracking_uri": cfg.tracking_uri,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": round(time.time() - start, 1),
    }
    print(f"[train] {cfg.phase} done in {summary['seconds']}s -> {summary['model_dir']}", file=sys.stderr)
    summary["mlflow_unsent"] = unsent_left(cfg.out, run_id)
    return summary


def _ordered_ingest_options():
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # data order is part of the run's determinism (resume == uninterrupted)
    return options


def _train_loop_entry(loop_config: dict) -> None:
    # imported in the worker so that DeepSpeed never loads in the driver
    from components.train.loop import train_loop

    train_loop(loop_config)
