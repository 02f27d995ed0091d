"""`make demo`'s command: the whole `tiny` pipeline on a fresh output root, then a re-run that skips every step.

What is checked: every step ran and left its outputs (stores with the corrupt records reported, the
trained and packed models, eval metrics of all three tasks, a served answer over HTTP), one MLflow
parent run with a nested run per step, and the re-run skipping every step. The trained model must
read the image: its VQAv2 accuracy on the held-out generated questions must beat the best image-blind
answerer on the same questions (the most common answer per question type) by at least 10 points
(measured: 70.7 against 45.3; a uniform guess among the valid answers scores about 26).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import _free_port

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import yaml

    from pipelines.demo import DEMO_CONFIG

    tmp = tmp_path_factory.mktemp("demo")
    with open(DEMO_CONFIG) as f:
        values = yaml.safe_load(f)
    values["serve"]["port"] = _free_port()  # only the port differs from `make demo`
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp / "out"
    proc = subprocess.run([os.path.join(BIN, "bitllava"), "demo", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return config, out, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_demo_runs_every_step_and_reports_metrics_and_the_served_answer(demo):
    _, out, summary, _ = demo
    vqa = summary["eval"]["vqav2"]
    assert 0 < vqa["blind_baseline"] < 100, vqa
    assert vqa["accuracy"] >= vqa["blind_baseline"] + 10, vqa  # it answers from the image, well above blind
    assert set(summary["eval"]) == {"pope", "vqav2", "textvqa"}
    assert 0 <= summary["eval"]["pope"]["accuracy"] <= 100
    assert summary["served"]["answer"].strip()
    assert os.path.isfile(os.path.join(summary["packed_dir"], "config.json"))
    for phase in ("align", "instruct"):
        manifest = json.loads((out / "stores" / phase / "manifest.json").read_text())
        assert manifest["counts"]["bad"] > 0  # the generated corrupt records, reported and skipped


def test_demo_tracks_one_parent_run_with_a_nested_run_per_step(demo):
    import mlflow

    _, out, summary, stderr = demo
    assert summary["mlflow_ui"] in stderr  # where to look
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("bitllava-demo")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.mlflow.parentRunId = '{summary['mlflow_parent_run_id']}'")
    names = {r.info.run_name for r in runs}
    assert {"preprocess-align", "preprocess-instruct", "train-align", "train-instruct", "eval-pope", "eval-vqav2",
            "eval-textvqa", "pack"} <= names, names


def test_rerun_skips_every_step_already_done(demo):
    config, out, _, _ = demo
    proc = subprocess.run([os.path.join(BIN, "bitllava"), "run", str(config), "--out", str(out), "--until", "pack"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[pipeline]")]
    assert not any(line.endswith(": running") for line in lines), lines
    assert sum(line.endswith("up to date, skipped") for line in lines) == 10, lines
