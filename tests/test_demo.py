"""`make demo` as a new user runs it: a fresh clone, `make demo` in it, the relative `demo_out`, no `--out`.

The clone gets the suite's virtual environment (`make demo VENV=...`, with setup marked done), so the
install is not repeated: CI's own fresh `make setup` covers it. The clone's code runs (PYTHONPATH),
with the clone as the working directory of every step, exactly as in a user's shell.

What is checked: every step ran and left its outputs (stores with the corrupt records reported, the
trained and packed models, eval metrics of all three tasks, a served answer over HTTP), one MLflow
parent run with a nested run per step, the commands the demo prints at its end work as printed, and a
re-run skips every step. The trained model must read the image: its VQAv2 accuracy on the held-out
generated questions must beat the best image-blind answerer on the same questions (the most common
answer per question type) by at least 10 points (measured: 70.7 against 45.3; a uniform guess among
the valid answers scores about 26).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from pipelines.config import ROOT
from tests.conftest import stop_process_group

pytestmark = pytest.mark.slow
VENV = os.path.dirname(os.path.dirname(sys.executable))
BIN = os.path.join(VENV, "bin")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    clone = tmp_path_factory.mktemp("newcomer") / "bitllava"
    subprocess.run(["git", "clone", "--quiet", ROOT, str(clone)], check=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(clone), "PATH": BIN + os.pathsep + os.environ["PATH"]}
    for key in ("MLFLOW_TRACKING_URI", "MAKEFLAGS", "MAKELEVEL", "MFLAGS"):  # a user's shell has none (CI: make test)
        env.pop(key, None)
    stamp = os.path.join(VENV, ".bitllava-installed")
    proc = subprocess.run(["make", "demo", f"VENV={VENV}", "-o", stamp], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the summary is the last line, JSON
    return clone, clone / "demo_out", summary, proc.stderr, env


def test_demo_runs_every_step_and_reports_metrics_and_the_served_answer(demo):
    _, out, summary, _, _ = demo
    vqa = summary["eval"]["vqav2"]
    assert 0 < vqa["blind_baseline"] < 100, vqa
    assert vqa["accuracy"] >= vqa["blind_baseline"] + 10, vqa  # it answers from the image, well above blind
    assert set(summary["eval"]) == {"pope", "vqav2", "textvqa"}
    assert 0 <= summary["eval"]["pope"]["accuracy"] <= 100
    assert summary["served"]["answer"].strip()
    assert summary["packed_dir"] == str(out / "packed")  # the relative demo_out, in the user's folder
    assert os.path.isfile(os.path.join(summary["packed_dir"], "config.json"))
    for phase in ("align", "instruct"):
        manifest = json.loads((out / "stores" / phase / "manifest.json").read_text())
        assert manifest["counts"]["bad"] > 0  # the generated corrupt records, reported and skipped


def test_demo_console_shows_steps_not_pages_of_internal_logs(demo):
    _, _, _, stderr, _ = demo
    lines = stderr.splitlines()
    assert sum(line.startswith("[pipeline]") for line in lines) >= 10
    noisy = [line for line in lines if " INFO " in line or line.startswith("[INFO")]
    assert len(noisy) < 40, noisy[:40]


def test_demo_tracks_one_parent_run_with_a_nested_run_per_step(demo):
    import mlflow

    _, out, summary, stderr, _ = demo
    assert summary["mlflow_ui"] in stderr  # where to look
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("bitllava-demo")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.mlflow.parentRunId = '{summary['mlflow_parent_run_id']}'")
    names = {r.info.run_name for r in runs}
    assert {"preprocess-align", "preprocess-instruct", "train-align", "train-instruct", "eval-pope", "eval-vqav2",
            "eval-textvqa", "pack"} <= names, names


def _wait_for(url: str, proc: subprocess.Popen, seconds: float) -> bytes:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"the command exited with {proc.returncode} before {url} answered"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {seconds}s")


def _run_printed(command: str, env: dict, cwd) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_the_commands_the_demo_prints_work_as_printed(demo, tmp_path):
    """Each command of the demo's closing lines, copied as printed, run from another folder."""
    _, _, summary, stderr, env = demo
    commands = summary["commands"]
    for command in commands.values():
        assert command in stderr  # printed for the user
    generate = subprocess.run(["bash", "-c", commands["generate"]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert generate.returncode == 0 and generate.stdout.strip(), generate.stderr[-3000:]

    serve = _run_printed(commands["serve"], env, tmp_path)  # the default port, 8000, as a user gets it
    try:
        models = json.loads(_wait_for("http://127.0.0.1:8000/v1/models", serve, 300))
        assert models["data"][0]["id"]
    finally:
        stop_process_group(serve)

    ui = _run_printed(commands["mlflow_ui"], env, tmp_path)  # mlflow ui's default port, 5000
    try:
        assert _wait_for("http://127.0.0.1:5000/health", ui, 120).strip() == b"OK"
    finally:
        stop_process_group(ui)


def test_rerun_skips_every_step_already_done(demo):
    clone, _, _, _, env = demo
    proc = subprocess.run([os.path.join(BIN, "bitllava"), "run", "pipelines/configs/tiny.yaml", "--until", "pack"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[pipeline]")]
    assert not any(line.endswith(": running") for line in lines), lines
    assert sum(line.endswith("up to date, skipped") for line in lines) == 10, lines
