"""A tracking-server outage during training: the run keeps its pace, every step reaches MLflow when the server is
back, and what cannot be sent by the end is kept in a local file that `bitllava runs replay` sends later.

Each test runs its own `mlflow server` (sqlite backend) and stops and restarts it on the same port and store.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import ray
from mlflow.tracking import MlflowClient

from components.data.preprocess import PreprocessConfig, preprocess
from components.data.synth import SynthConfig, synthesize
from components.train.config import load_train_config
from components.train.run import run_training
from model.checkpoint import save_model
from model.presets import build_from_preset
from tests.conftest import _free_port, stop_process_group

pytestmark = pytest.mark.slow
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines", "configs", "train")
STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s")


class MlflowServer:
    """An `mlflow server` that can be stopped and started again on the same port and backend store."""

    def __init__(self, root):
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240  # a loaded 2-core machine can take a minute
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process_group(self.proc, term_wait=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("outage")
    synth = synthesize(SynthConfig(out=str(root / "synth"), records=32, eval=0, seed=3))
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    save_model(str(root / "base"), model, tokenizer, processor)
    ray.init(num_cpus=2, include_dashboard=False)
    cc = synth["cc595k"]
    preprocess(PreprocessConfig(source="cc595k", json=cc["json"], images=cc["images"], out=str(root / "align"),
                                phase="align", model=str(root / "base"), shard_records=8))
    yield root
    ray.shutdown()


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    stop_process_group(srv.proc, term_wait=10)


def _config(store, out, server, steps: int):
    return load_train_config(os.path.join(CONFIGS, "tiny-align.yaml"), data=str(store / "align"), out=str(out),
                             init=str(store / "base"), workers=1, epochs=200, max_steps=steps, checkpoint_every=1000,
                             tracking_uri=server.url, experiment="outage", run_name="align-outage")


def _train_in_background(cfg) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["summary"] = run_training(cfg)
        except BaseException as err:  # reported by the test
            result["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def _logged_steps(url: str, experiment: str = "outage") -> list:
    """The loss history of the experiment's only run (empty until the run has logged)."""
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return client.get_metric_history(runs[0].info.run_id, "loss") if runs else []


def _wait_for_steps(url: str, n: int, thread, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(_logged_steps(url)) < n:
        assert thread.is_alive() and time.time() < deadline, "training ended or stalled before the outage"
        time.sleep(0.2)


def test_training_keeps_its_pace_while_the_server_is_away_and_every_step_arrives(store, server, tmp_path):
    steps = 1200  # about 20 steps/s on 2 idle cores: the run outlasts the outage
    thread, result = _train_in_background(_config(store, tmp_path / "run", server, steps))
    _wait_for_steps(server.url, 3, thread)
    server.stop()
    down = time.time()
    time.sleep(20)
    up = time.time()  # the server is away from `down` to `up`, and until it has started again
    server.start()
    thread.join(300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["mlflow_unsent"] is None

    client = MlflowClient(server.url)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in STEP_METRICS:  # every step, once
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, steps + 1)), key
    # the timestamps are taken at each step on rank 0: the pace while the server was away vs before it went
    stamps = sorted((m.timestamp / 1000, m.step) for m in client.get_metric_history(run.info.run_id, "loss"))
    during = [s for t, s in stamps if down + 1 <= t <= up - 1]
    before = [(t, s) for t, s in stamps if t < down]
    rate_down = len(during) / (up - down - 2)
    rate_before = (before[-1][1] - before[0][1]) / max(before[-1][0] - before[0][0], 1e-3) if len(before) > 1 else 0
    print(f"steps/s before the outage {rate_before:.2f}, while the server was away {rate_down:.2f} "
          f"({len(during)} steps in {up - down - 2:.0f} s)")
    assert len(during) >= 10, (len(during), stamps)
    if rate_before:  # a stalled run makes no steps at all; 0.3 leaves room for a shared machine's noise
        assert rate_down >= 0.3 * rate_before, (rate_down, rate_before)
    assert {"final_loss", "system/cpu_utilization_percentage"} <= set(run.data.metrics)
    assert run.data.tags["model_uri"] == summary["model_dir"]


def test_server_away_until_the_end_leaves_a_file_that_replay_sends(store, server, tmp_path):
    steps = 300
    out = tmp_path / "run"
    thread, result = _train_in_background(_config(store, out, server, steps))
    _wait_for_steps(server.url, 2, thread)
    run_id = MlflowClient(server.url).search_runs(
        [MlflowClient(server.url).get_experiment_by_name("outage").experiment_id])[0].info.run_id
    server.stop()
    thread.join(300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    unsent = out / "mlflow-unsent" / f"{run_id}.jsonl"
    assert summary["mlflow_unsent"] == str(unsent)
    lines = [json.loads(line) for line in unsent.read_text().splitlines()]
    assert lines[0] == {"tracking_uri": server.url, "run_id": run_id}
    kept = {m[3] for record in lines[1:] for m in record.get("metrics", []) if m[0] == "loss"}
    assert max(kept) == steps and lines[-1]["status"] == "FINISHED"
    assert (out / "mlflow-unsent" / f"{run_id}-loss_curve.png").stat().st_size > 1000

    server.start()
    bitllava = os.path.join(os.path.dirname(sys.executable), "bitllava")
    replayed = subprocess.run([bitllava, "runs", "replay", str(unsent)], capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 0, replayed.stderr
    report = json.loads(replayed.stdout.strip().splitlines()[-1])
    assert report["run_id"] == run_id and report["status"] == "FINISHED"
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in STEP_METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, steps + 1)), key
    assert "final_loss" in run.data.metrics and run.data.tags["model_uri"] == summary["model_dir"]
    assert not unsent.exists() and unsent.with_name(unsent.name + ".replayed").exists()
