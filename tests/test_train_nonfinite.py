"""Non-finite training steps on 2 Ray Train + DeepSpeed workers: a store holding a poisoned sample (inf image
features) trains to the end with that step skipped, counted in MLflow and logged with its sample ids; a store
where every step is poisoned stops with a clear error after `max_consecutive_skips`, the last checkpoint
intact. (That a skipped step updates nothing and that clean steps update exactly as before is shown on a
single-rank engine in test_train_units.py.)"""

import glob
import json
import os
import shutil
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from components import storage
from components.data.preprocess import (EncodeGroups, PrepareGroups, PreprocessConfig, build_manifest, fingerprint,
                                        group_records, load_processing, processing_identity, write_groups)
from components.data.store import load_manifest
from components.data.synth import SynthConfig, synthesize
from components.train.checkpointing import DS_TAG, TRAINER_STATE
from components.train.config import load_train_config
from components.train.data import plan_epochs
from components.train.step import NonFiniteStepsError
from components.train.run import run_training
from model.checkpoint import read_state_dict, save_model
from model.presets import build_from_preset

pytestmark = pytest.mark.slow
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines", "configs", "train")


def features_store(cfg: PreprocessConfig) -> dict:
    """`bitllava data preprocess --encode features` run in this process, without Ray Data (seconds, not tens):
    the same prepare, encode and write steps, then the manifest."""
    tokenizer, processor, image_tokens, max_length, config = load_processing(cfg)
    identity = processing_identity(cfg, tokenizer, processor, config)
    json_bytes = storage.read_bytes(cfg.json)
    records, attempt = json.loads(json_bytes), uuid.uuid4().hex
    groups = PrepareGroups(cfg, tokenizer, processor, image_tokens, max_length)(group_records(records, set()))
    encode = EncodeGroups(cfg.model)
    for i in range(0, len(groups), 4):
        write_groups(encode(pa.Table.from_pylist(groups[i: i + 4])).to_pylist(), cfg.out, None, attempt)
    manifest = build_manifest(cfg, fingerprint(cfg, json_bytes, identity), records, identity, attempt)
    storage.write_bytes_atomic(storage.join(cfg.out, "manifest.json"), json.dumps(manifest).encode())
    return manifest


def poisoned_copy(store, out, poison) -> list[tuple[str, int]]:
    """A copy of `store` whose samples with images chosen by `poison(part, row)` have image features of inf
    (float16); returns the (record id, store idx) of each."""
    shutil.copytree(store, out)
    hit = []
    for path in sorted(glob.glob(str(out / "parts" / "*.parquet"))):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for i, row in enumerate(rows):
            if row["num_images"] and poison(os.path.basename(path), i):
                row["images"] = np.full(row["image_shape"], np.inf, np.float16).tobytes()
                hit.append((row["id"], row["idx"]))
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return hit


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    synth = synthesize(SynthConfig(out=str(root / "synth"), records=32, eval=0, seed=5))
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    save_model(str(root / "base"), model, tokenizer, processor)
    inst = synth["instruct"]
    features_store(PreprocessConfig(source="instruct", json=inst["json"], images=inst["images"],
                                    out=str(root / "clean"), phase="instruct", encode="features",
                                    model=str(root / "base"), shard_records=8))
    context = ray.init(num_cpus=2, include_dashboard=False)
    yield root, context.address_info["session_dir"]
    ray.shutdown()


def instruct_config(root, data, out, **overrides):
    # one epoch: every sample is trained on at most once, so one poisoned sample makes one skipped step
    return load_train_config(os.path.join(CONFIGS, "tiny-instruct.yaml"), data=str(data), out=str(out),
                             init=str(root / "base"), epochs=1, **overrides)


def metric(tracking_uri, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def worker_log_lines(session_dir: str, needle: str, timeout: float = 20) -> list[str]:
    """Lines holding `needle` in the Ray workers' stdout files (what a user sees in `ray logs` / the console)."""
    deadline = time.time() + timeout
    while True:
        lines = [line for path in glob.glob(os.path.join(session_dir, "logs", "worker-*.out"))
                 for line in open(path, errors="replace") if needle in line]
        if lines or time.time() > deadline:
            return lines
        time.sleep(0.5)


def test_a_poisoned_sample_is_skipped_counted_logged_and_training_finishes(stores):
    root, session_dir = stores
    manifest = load_manifest(str(root / "clean"))
    cfg = instruct_config(root, root / "poisoned", root / "run-poisoned")
    # one sample (with an image) of those rank 1 trains on in the epoch: trained on for sure, on one rank only
    # (the other rank's batch is finite: both must agree to skip, from DeepSpeed's all-reduced gradient norm)
    plan = plan_epochs(manifest, cfg.workers, cfg.per_device_batch, cfg.grad_accum, cfg.epochs, cfg.seed)
    rank1 = {(name, row) for name, start, stop in plan[0]["ranges"][1] for row in range(start, stop)}
    chosen = []

    def poison(name, row):
        if (name, row) in rank1 and not chosen:
            chosen.append((name, row))
            return True
        return False

    (poisoned_id, poisoned_idx), = poisoned_copy(root / "clean", root / "poisoned", poison)

    summary = run_training(cfg)

    steps = sum(e["micro_steps"] for e in plan) // cfg.grad_accum
    assert summary["metrics"]["step"] == steps and summary["metrics"]["skipped_steps"] == 1
    skipped = metric(summary["tracking_uri"], summary["mlflow_run_id"], "skipped_steps")
    skipped_at = next(step for step, value in skipped if value == 1)
    assert [v for _, v in skipped] == [0] * (skipped_at - 1) + [1] * (steps - skipped_at + 1)
    losses = dict(metric(summary["tracking_uri"], summary["mlflow_run_id"], "loss"))
    assert sorted(losses) == list(range(1, steps + 1))
    assert [s for s, v in losses.items() if not np.isfinite(v)] == [skipped_at]  # logged as it was: NaN
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["final_skipped_steps"] == 1

    label = f"{poisoned_id} (#{poisoned_idx})"
    lines = worker_log_lines(session_dir, f"[train] step {skipped_at} skipped")
    assert lines and label in lines[0] and "non-finite loss on 1 of 2 ranks" in lines[0], lines
    final = read_state_dict(summary["model_dir"])
    assert all(torch.isfinite(v).all() for v in final.values())
    base = read_state_dict(str(root / "base"))
    key = "multi_modal_projector.linear_1.weight"
    assert not torch.equal(final[key], base[key])


def test_every_step_poisoned_stops_with_a_clear_error_and_keeps_the_last_checkpoint(stores):
    root, _ = stores
    poisoned_copy(root / "clean", root / "all-poisoned", lambda name, row: True)
    out = root / "run-all-poisoned"
    # restarts allowed: the stop is not a worker failure, so Ray Train must not retry it (a retry would resume at
    # step 2 and log step 3 again, below)
    cfg = instruct_config(root, root / "all-poisoned", out, max_consecutive_skips=2, checkpoint_every=2,
                          max_failures=2)
    with pytest.raises(NonFiniteStepsError) as caught:  # raised in the driver, one message
        run_training(cfg)
    message = str(caught.value)
    assert message.startswith("training stopped at optimizer step 3: 3 steps in a row (since step 1)"), message
    assert "max_consecutive_skips=2" in message and "the last checkpoint (step 2) is intact" in message

    checkpoints = sorted(p for p in glob.glob(str(out / "ray" / "instruct" / "checkpoint_*")) if os.path.isdir(p))
    assert len(checkpoints) == 1  # the one of step 2; nothing was written when the run stopped
    state = json.loads(open(os.path.join(checkpoints[0], TRAINER_STATE)).read())
    assert state["global_step"] == 2 and state["skips"] == {"total": 2, "consecutive": 2, "first_of_streak": 1}
    module = torch.load(os.path.join(checkpoints[0], DS_TAG, "mp_rank_00_model_states.pt"),
                        map_location="cpu", weights_only=False)["module"]
    base = read_state_dict(str(root / "base"))
    assert all(torch.equal(module[k].float(), base[k].float()) for k in base)  # finite, never updated
    assert not os.path.exists(out / "model")
    client = MlflowClient(cfg.tracking_uri)
    run, = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id],
                              filter_string=f"params.out = '{out}'")
    assert metric(cfg.tracking_uri, run.info.run_id, "skipped_steps") == [(1, 1), (2, 2), (3, 3)]
    assert run.info.status == "FAILED"
