"""`bitllava submit` through the Ray Jobs API to a multi-node local cluster (`ray start` head + worker)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.config import ROOT
from pipelines.submit import wait_for_job
from tests.conftest import _free_port

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


def _start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block` in its own process group, so teardown stops exactly this node (not `ray stop`,
    which would stop every Ray process on the machine)."""
    return subprocess.Popen([os.path.join(BIN, "ray"), "start", "--block", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_node(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": BIN + os.pathsep + os.environ["PATH"]}
    gcs, dashboard, client = _free_port(), _free_port(), _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    nodes = [_start_node(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                          str(dashboard), "--ray-client-server-port", str(client), "--temp-dir",
                          str(tmp_path_factory.mktemp("ray-head")), *common], env)]
    try:
        status = ""
        for _ in range(120):
            probe = subprocess.run([os.path.join(BIN, "ray"), "status", "--address", f"127.0.0.1:{gcs}"], env=env,
                                   capture_output=True, text=True, timeout=60)
            status = probe.stdout
            if probe.returncode == 0:
                if len(nodes) == 1:
                    # A second node joining over loopback, with its own temp dir: two nodes on one host
                    # otherwise share the session's runtime_resources folder, and one node's runtime-env
                    # agent can delete a job package that the other's job driver is running in.
                    nodes.append(_start_node(["--address", f"127.0.0.1:{gcs}", "--temp-dir",
                                              str(tmp_path_factory.mktemp("ray-worker")), *common], env))
                elif status.split("Pending:")[0].count("node_") == 2:
                    break
            time.sleep(1)
        assert status.split("Pending:")[0].count("node_") == 2, status
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for node in reversed(nodes):
            _stop_node(node)


def test_submit_runs_pipeline_steps_on_the_cluster(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "run"
    bitllava = os.path.join(BIN, "bitllava")
    proc = subprocess.run([bitllava, "submit", os.path.join(ROOT, "pipelines", "configs", "tiny.yaml"),
                           "--address", address, "--out", str(out), "--until", "preprocess-align"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        final = wait_for_job(job_id, address, timeout_s=900)
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
    status = json.loads(subprocess.run([bitllava, "status", job_id, "--address", address], env=env,
                                       capture_output=True, text=True, timeout=120).stdout)
    logs = subprocess.run([bitllava, "logs", job_id, "--address", address], env=env, capture_output=True,
                          text=True, timeout=120).stdout
    assert final == "SUCCEEDED" and status["status"] == "SUCCEEDED", logs[-3000:]
    assert "[pipeline] preprocess-align: done" in logs and "stopped after preprocess-align" in logs
    manifest = json.loads((out / "stores" / "align" / "manifest.json").read_text())
    assert manifest["counts"]["samples"] > 1000  # 1200 generated caption records, a few corrupt ones
    assert not (out / "stores" / "instruct").exists()  # the job stopped where it was told to
