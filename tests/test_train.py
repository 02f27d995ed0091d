"""Two-phase training with Ray Train + DeepSpeed on 2 CPU workers, MLflow, fault tolerance."""

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from components.data.preprocess import PreprocessConfig, preprocess
from components.data.synth import SynthConfig, synthesize
from components.train.config import load_train_config
from components.train.run import run_training
from model.assemble import init_model
from model.checkpoint import load_model, read_state_dict, save_model
from model.presets import build_from_preset
from tests.backbone_folders import write_tower_folder

pytestmark = pytest.mark.slow
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines", "configs", "train")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    synth = synthesize(SynthConfig(out=str(root / "synth"), records=64, eval=0, seed=11))
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    save_model(str(root / "base"), model, tokenizer, processor)
    ray.init(num_cpus=2, include_dashboard=False)
    cc, inst = synth["cc595k"], synth["instruct"]
    preprocess(PreprocessConfig(source="cc595k", json=cc["json"], images=cc["images"], out=str(root / "align"),
                                phase="align", model=str(root / "base"), shard_records=8))
    # the instruct store holds cached tower features: training skips the vision tower
    preprocess(PreprocessConfig(source="instruct", json=inst["json"], images=inst["images"],
                                out=str(root / "instruct"), phase="instruct", encode="features",
                                model=str(root / "base"), shard_records=8))
    yield root
    ray.shutdown()


def losses(summary) -> list[float]:
    history = MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"], "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def falling(values: list[float]) -> bool:
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k < sum(values[:k]) / k - 0.05


@pytest.fixture(scope="module")
def align_run(stores):
    cfg = load_train_config(os.path.join(CONFIGS, "tiny-align.yaml"), data=str(stores / "align"),
                            out=str(stores / "run-align"), init=str(stores / "base"))
    return run_training(cfg)


@pytest.fixture(scope="module")
def instruct_run(stores, align_run):
    cfg = load_train_config(os.path.join(CONFIGS, "tiny-instruct.yaml"), data=str(stores / "instruct"),
                            out=str(stores / "run-instruct"), init=align_run["model_dir"], checkpoint_every=3)
    return run_training(cfg)


def test_align_trains_only_the_projector_and_loss_falls(stores, align_run):
    assert falling(losses(align_run)), losses(align_run)
    before = read_state_dict(str(stores / "base"))
    after = read_state_dict(align_run["model_dir"])
    assert before.keys() == after.keys()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("multi_modal_projector."), name
    assert load_model(align_run["model_dir"]).multimodal  # from_pretrained-loadable final model


def test_instruct_starts_from_the_align_projector_and_trains_the_llm(stores, align_run, instruct_run):
    assert falling(losses(instruct_run)), losses(instruct_run)
    client = MlflowClient(instruct_run["tracking_uri"])
    assert client.get_run(instruct_run["mlflow_run_id"]).data.params["init"] == align_run["model_dir"]
    aligned = read_state_dict(align_run["model_dir"])
    tuned = read_state_dict(instruct_run["model_dir"])
    assert all(torch.equal(aligned[k], tuned[k]) for k in aligned if k.startswith("vision_tower."))
    assert not torch.equal(aligned["language_model.model.transformer.blocks.0.ff_proj.weight"],
                           tuned["language_model.model.transformer.blocks.0.ff_proj.weight"])
    assert not torch.equal(aligned["multi_modal_projector.linear_1.weight"],
                           tuned["multi_modal_projector.linear_1.weight"])


def test_instruct_with_zero3_and_a_real_mlflow_server(stores, align_run, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    parent = client.create_run(client.create_experiment("bitllava-test-pipeline"), run_name="pipeline")
    cfg = load_train_config(os.path.join(CONFIGS, "tiny-instruct.yaml"), data=str(stores / "instruct"),
                            out=str(stores / "run-z3"), init=align_run["model_dir"], zero_stage=3, z_loss=1e-4,
                            tracking_uri=mlflow_server, experiment="bitllava-test-pipeline",
                            parent_run_id=parent.info.run_id, run_name="instruct-z3")
    summary = run_training(cfg)
    assert falling(losses(summary))
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["zero_stage"] == "3" and run.data.params["phase"] == "instruct"
    assert int(run.data.params["trainable_params"]) > 600_000
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "z_loss"} <= set(run.data.metrics)
    assert run.data.params["z_loss"] == "0.0001" and run.data.metrics["z_loss"] > 0  # Chameleon's term, logged
    assert run.data.tags["dataset_content_hash"] == json.load(open(stores / "instruct" / "manifest.json"))[
        "content_hash"]
    assert run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "deepspeed_config.json", "train_config.yaml", "model"} <= artifacts
    ds_config = json.loads(open(client.download_artifacts(run.info.run_id, "deepspeed_config.json")).read())
    assert ds_config["zero_optimization"]["stage"] == 3 and "auto" not in json.dumps(ds_config)
    assert load_model(summary["model_dir"]).multimodal  # ZeRO-3 partitions gathered into a full model

    png = tmp_path / "compare.png"
    bitllava = os.path.join(os.path.dirname(sys.executable), "bitllava")
    out = subprocess.run([bitllava, "runs", "compare", "--experiment", "bitllava-test-pipeline",
                          "--tracking-uri", mlflow_server, "--png", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "instruct-z3" in out.stdout and "pipeline" in out.stdout and "final loss" in out.stdout
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_partly_trained_tower_changes_exactly_its_upper_layers(stores, zero_stage, tmp_path):
    # a 3-layer CLIP tower (vision_feature_layer -2: layers 0 and 1 reach the features), trained from layer 1 as
    # TinyLLaVA's share recipe trains the upper tower, with the projector and, under ZeRO-3, the LLM too
    tower = write_tower_folder(str(tmp_path / "clip3"), "clip", seed=5)
    model, tokenizer, processor = init_model("tiny", vision=tower)
    save_model(str(tmp_path / "base"), model, tokenizer, processor)
    llm = "full" if zero_stage == 3 else "frozen"
    cfg = load_train_config(os.path.join(CONFIGS, "tiny-align.yaml"), data=str(stores / "align"),
                            out=str(tmp_path / "run"), init=str(tmp_path / "base"), zero_stage=zero_stage,
                            max_steps=3, tune_vision="partial", tune_vision_from_layer=1, tune_llm=llm, vision_lr=5e-4)
    summary = run_training(cfg)
    before, after = read_state_dict(str(tmp_path / "base")), read_state_dict(summary["model_dir"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in before if k.startswith(("multi_modal_projector.", "vision_tower.encoder.layers.1."))
               or (llm == "full" and k.startswith("language_model."))}
    assert changed == trained
    params = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.params
    assert (params["tune_vision"], params["tune_vision_from_layer"], params["tune_llm"]) == ("partial", "1", llm)


def _kill_a_worker_after_first_checkpoint(run_dir, killed: list):
    deadline = time.time() + 600
    while time.time() < deadline:
        ckpts = [d for d in os.listdir(run_dir) if d.startswith("checkpoint_")] if os.path.isdir(run_dir) else []
        if ckpts:
            for proc in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


def test_killed_worker_resumes_and_matches_an_uninterrupted_run(stores, align_run, instruct_run):
    out = stores / "run-killed"
    cfg = load_train_config(os.path.join(CONFIGS, "tiny-instruct.yaml"), data=str(stores / "instruct"),
                            out=str(out), init=align_run["model_dir"], checkpoint_every=3)
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(str(out / "ray" / "instruct"), killed))
    killer.start()
    summary = run_training(cfg)
    killer.join()
    assert killed, "no worker was killed"
    reference = read_state_dict(instruct_run["model_dir"])
    resumed = read_state_dict(summary["model_dir"])
    # tolerance: float noise only (identical data order and optimizer state after the restart)
    worst = max((reference[k] - resumed[k]).abs().max().item() for k in reference)
    assert worst <= 1e-5, worst
    assert summary["metrics"]["step"] == instruct_run["metrics"]["step"]
