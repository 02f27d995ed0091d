"""`bitllava submit` through the Ray Jobs API to a multi-node local cluster (`ray start` head + worker).

The nodes are started as a user who did not activate the venv would start them (`.venv/bin/ray start`
with the system's PATH), so the job's `python3` is not the cluster's interpreter: the job's entry
point must find it. Ray 2.60 turns token authentication on: without RAY_AUTH_MODE=token the client
gets one line naming the fix.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from pipelines.config import ROOT
from pipelines.submit import wait_for_job
from tests.conftest import _free_port, stop_process_group

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


def _start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block` in its own process group, so teardown stops exactly this node (not `ray stop`,
    which would stop every Ray process on the machine)."""
    return subprocess.Popen([os.path.join(BIN, "ray"), "start", "--block", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    system_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if os.path.abspath(p) != BIN)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": system_path}
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
            stop_process_group(node, term_wait=30)


def test_submit_without_token_mode_is_one_line_naming_the_fix(cluster):
    address, env = cluster
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([os.path.join(BIN, "bitllava"), "submit", "pipelines/configs/tiny.yaml", "--address", address,
                           "--dry-run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "RAY_AUTH_MODE=token" in proc.stderr


def test_submit_runs_pipeline_steps_on_the_cluster(cluster, tmp_path):
    """The tiny pipeline through preprocessing and the first training phase (where relative paths used to
    reach Train workers), submitted from the repository root with the README's relative config path."""
    address, env = cluster
    out = tmp_path / "run"
    bitllava = os.path.join(BIN, "bitllava")
    proc = subprocess.run([bitllava, "submit", "pipelines/configs/tiny.yaml", "--address", address, "--out", str(out),
                           "--until", "train-align"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        final = wait_for_job(job_id, address, timeout_s=1200)
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
    status = json.loads(subprocess.run([bitllava, "status", job_id, "--address", address], env=env,
                                       capture_output=True, text=True, timeout=120).stdout)
    logs = subprocess.run([bitllava, "logs", job_id, "--address", address], env=env, capture_output=True,
                          text=True, timeout=120).stdout
    assert final == "SUCCEEDED" and status["status"] == "SUCCEEDED", logs[-3000:]
    assert "[pipeline] train-align: done" in logs and "stopped after train-align" in logs
    assert "is a local folder, but the cluster has 2 nodes" in logs  # the multi-node warning names the fix
    manifest = json.loads((out / "stores" / "align" / "manifest.json").read_text())
    assert manifest["counts"]["samples"] > 1000  # 1200 generated caption records, a few corrupt ones
    assert (out / "align" / "model" / "config.json").is_file()
    assert not (out / "instruct").exists()  # the job stopped where it was told to
