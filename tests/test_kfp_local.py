"""The Kubeflow pipeline, compiled from the `tiny` config and run locally with kfp.local.SubprocessRunner.

Every task is the production component (`pipeline_step`) in a subprocess of this environment; each
starts its own local Ray, runs its step, and leaves the step marker that the next task builds on.
The data and the training are cut down so the whole DAG runs in a few minutes on 2 cores.
"""

import json
import os

import pytest
import yaml

from pipelines.config import ROOT
from pipelines.run import STEPS
from tests.conftest import _free_port

pytestmark = pytest.mark.slow


def test_kfp_pipeline_runs_locally_with_subprocess_runner(tmp_path, monkeypatch):
    from kfp import local

    from pipelines.kfp_pipeline import build_pipeline

    with open(os.path.join(ROOT, "pipelines", "configs", "tiny.yaml")) as f:
        values = yaml.safe_load(f)
    values["data"]["synth"] = {"records": 240, "eval": 8, "corrupt": 1}
    for phase in ("align", "instruct"):
        values[phase].update(epochs=1, checkpoint_every=100)
    # TinyLLaVA's share stage between them (LLM + projector + tower), a few steps: every step kind runs once
    values["share"] = {"config": "train/tiny-share.yaml", "max_steps": 3, "checkpoint_every": 100}
    values["preprocess"]["shard_records"] = 48  # parts enough for both ranks
    values["eval"].update(limit=8, batch_size=8)
    values["serve"]["port"] = _free_port()
    config = tmp_path / "tiny-kfp.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"

    monkeypatch.chdir(tmp_path)  # the tasks find the project by its install, not the working directory
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    run = build_pipeline(str(config))(config=str(config), ray_address="", out=str(out))
    assert run is not None

    done = {name[: -len(".json")] for name in os.listdir(out / "_steps")}
    assert done == set(STEPS) - {"eval", "deploy"} | {"eval-pope", "eval-vqav2", "eval-textvqa"}
    for task in ("pope", "vqav2", "textvqa"):
        metrics = json.loads((out / "_steps" / f"eval-{task}.json").read_text())["result"]
        assert metrics["metrics"], metrics
    assert (out / "packed" / "config.json").exists()
    # the share stage started from the align model, and instruct from the share model
    share = json.loads((out / "_steps" / "train-share.json").read_text())["result"]
    assert share["model_dir"] == str(out / "share" / "model")
    manifest = json.loads((out / "stores" / "instruct" / "manifest.json").read_text())
    assert manifest["counts"]["samples"] > 200
