"""Object-store outages: a real SeaweedFS server stopped and restarted under preprocessing and checkpoint saves.

The server of this file is its own (the session's `s3_server` must stay up for other tests). Clients reach
it through a small TCP proxy that stops it at a chosen request, the first write of the Nth part or the
Nth checkpoint, so that each outage lands on the operation under test rather than near it. A stop is a
SIGKILL (a crash); a restart reuses the data folder and the ports.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import boto3
import pytest
import ray
from botocore.config import Config

from components import storage
from components.data.preprocess import PreprocessConfig, preprocess
from components.data.store import committed_parts
from components.data.synth import SynthConfig, synthesize
from components.storage import StorageUnavailableError
from components.train.config import load_train_config
from components.train.run import run_training
from model.checkpoint import read_state_dict, save_model
from model.presets import build_from_preset
from tests.conftest import _free_port, _wait_until_ready

pytestmark = pytest.mark.slow
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines", "configs", "train")
BUCKET = "outage"
OUTAGE_S = 27  # the server stays down this long, then takes about 3 s to serve again: about 30 s away
SHORT_BUDGET_S = 2  # retry budget of the runs that must give up


class Seaweed:
    """`weed server` (master, volume, filer, S3) on loopback that can be killed and started again."""

    def __init__(self, root):
        self.root, self.proc, self.has_bucket = root, None, False
        access, secret = "bitllava", "bitllava-secret"
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
            {"accessKey": access, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (root / "data").mkdir()
        ports = {name: _free_port() for name in ("s3", "master", "volume", "filer")}
        grpc = [f"-{name}.port.grpc={_free_port()}" for name in ports]
        weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
        # a 1 s election timeout: a restarted single master leads again in about a second (default 10 s)
        self.cmd = [weed, "server", f"-dir={root / 'data'}", "-s3", f"-s3.port={ports['s3']}",
                    f"-s3.config={config}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                    f"-filer.port={ports['filer']}", *grpc, "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-master.electionTimeout=1s", "-volume.preStopSeconds=0", "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1"]
        self.port = ports["s3"]
        self.env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}
        self.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", region_name="us-east-1",
                                   aws_access_key_id=access, aws_secret_access_key=secret,
                                   config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))

    def start(self) -> None:
        log = open(self.root / "weed.log", "a")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def serving() -> bool:  # a write and a read through the S3 API, not just an open port
            self.client.put_object(Bucket=BUCKET, Key="_probe", Body=b"ok")
            return self.client.get_object(Bucket=BUCKET, Key="_probe")["Body"].read() == b"ok"

        if not self.has_bucket:
            _wait_until_ready(self.proc, lambda: self.client.create_bucket(Bucket=BUCKET) is not None, 60,
                              "seaweedfs", self.root / "weed.log")
            self.has_bucket = True
        _wait_until_ready(self.proc, serving, 60, "seaweedfs", self.root / "weed.log")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class StopAt:
    """A TCP proxy to the server. `arm(action, (pattern, n), ...)` runs `action` (e.g. stop the server), before
    the request goes on, when the stages have happened in order: the nth distinct object name matching a
    stage's pattern written (PUT/POST), then the next stage's."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.armed = None
        self.fired = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, action, *stages: tuple[str, int]) -> None:
        with self.lock:
            self.armed = ([(re.compile(rb"^(?:PUT|POST) /" + p.encode()), n, set()) for p, n in stages], action)
            self.fired.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:  # the server is down: the client sees a closed connection
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _check(self, data: bytes) -> None:
        with self.lock:
            if self.armed is None:
                return
            stages, action = self.armed
            pattern, nth, names = stages[0]
            m = pattern.match(data)
            if not m:
                return
            names.add(m.group(1))
            if len(names) < nth:
                return
            stages.pop(0)
            if stages:
                return
            self.armed = None
        action()
        self.fired.set()

    def _pump(self, src, dst, inspect: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if inspect:
                    self._check(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(Seaweed, StopAt proxy): AWS_* point at the proxy for this module (and its Ray cluster's workers)."""
    root = tmp_path_factory.mktemp("seaweedfs-outage")
    weed = Seaweed(root)
    weed.start()
    proxy = StopAt(weed.port)
    env = {**weed.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3"]}
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.update(env)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)  # after the variables, so that its workers get them
    yield weed, proxy
    ray.shutdown()
    weed.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("outage-data")
    summary = synthesize(SynthConfig(out=str(root / "synth"), records=120, eval=0, corrupt=1, seed=5))
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    save_model(str(root / "base"), model, tokenizer, processor)
    return root, summary


def cc_config(root, summary, out, **kw) -> PreprocessConfig:
    cc = summary["cc595k"]
    return PreprocessConfig(source="cc595k", json=cc["json"], images=cc["images"], out=str(out), phase="align",
                            model=str(root / "base"), shard_records=4, **kw)


class Outage:
    """Called (by the proxy): stops the server, and starts it again `seconds` later in a thread."""

    def __init__(self, weed: Seaweed, seconds: float):
        self.weed, self.seconds = weed, seconds
        self.thread, self.back_at = None, None

    def __call__(self) -> None:
        self.weed.stop()
        self.thread = threading.Thread(target=self._restart)
        self.thread.start()

    def _restart(self) -> None:
        time.sleep(self.seconds)
        self.weed.start()
        self.back_at = time.monotonic()

    def waited_out(self, finished_at: float) -> bool:
        """The outage happened and the run ended after the server was back."""
        self.thread.join()
        return self.back_at is not None and finished_at > self.back_at


def one_line_naming(err: BaseException, uri_prefix: str, budget: float) -> bool:
    text = str(err)
    return "\n" not in text and uri_prefix in text and f"retry budget of {budget:g} s" in text


def test_preprocess_survives_an_outage_and_a_spent_budget_keeps_its_parts(server, data):
    weed, proxy = server
    root, summary = data
    reference = preprocess(cc_config(root, summary, root / "reference"))  # local, undisturbed
    out = f"s3://{BUCKET}/store"
    parts = rf"{BUCKET}/store/parts/(part-[^?\s]+)"

    # budget 2 s: the server dies at the third part's upload and stays down -> one clear error
    proxy.arm(weed.stop, (parts, 3))
    with pytest.raises(StorageUnavailableError) as failed:
        preprocess(cc_config(root, summary, out, storage_retry_s=SHORT_BUDGET_S))
    assert proxy.fired.is_set()
    assert one_line_naming(failed.value, f"{out}/parts/part-", SHORT_BUDGET_S), str(failed.value)
    weed.start()
    kept = committed_parts(out)
    assert 2 <= len(kept) < len(reference["parts"]) and not storage.exists(f"{out}/manifest.json")

    # default budget: the rerun resumes from the committed parts; the server dies at its second new part
    # and comes back OUTAGE_S later; the run waits it out and ends with the undisturbed store
    outage = Outage(weed, OUTAGE_S)
    proxy.arm(outage, (parts, 2))
    resumed = preprocess(cc_config(root, summary, out))
    assert proxy.fired.is_set() and outage.waited_out(time.monotonic())
    assert resumed["content_hash"] == reference["content_hash"]
    assert resumed["counts"] == reference["counts"]
    indices = [i for f in committed_parts(out).values() for i in f["indices"]]
    assert len(indices) == len(set(indices)) == reference["counts"]["records"]


def train_config(root, out, tracking: str):
    return load_train_config(os.path.join(CONFIGS, "tiny-align.yaml"), data=str(root / "reference"), out=out,
                             init=str(root / "base"), workers=1, cpus_per_worker=1.0, max_steps=6,
                             checkpoint_every=2, max_failures=0, tracking_uri=f"sqlite:///{root / tracking}")


def download(prefix: str, folder) -> str:
    fs, path = storage.filesystem(prefix)
    os.makedirs(folder, exist_ok=True)
    import pyarrow.fs as pafs

    pafs.copy_files(path, str(folder), source_filesystem=fs)
    return str(folder)


def test_checkpoint_save_survives_an_outage_and_a_failed_save_resumes(server, data, monkeypatch, capfd):
    weed, proxy = server
    root, _ = data
    if not (root / "reference").exists():  # the store of the preprocess test
        preprocess(cc_config(root, data[1], root / "reference"))
    reference = run_training(train_config(root, str(root / "run-reference"), "ref.db"))  # local, undisturbed
    out = f"s3://{BUCKET}/run"
    checkpoints = rf"{BUCKET}/run/ray/align/(checkpoint_\d[^/?\s]+)"

    def registered() -> list:
        """The checkpoints Ray Train's registry (its commit record) lists, read from the server directly."""
        try:
            body = weed.client.get_object(Bucket=BUCKET, Key="run/ray/align/checkpoint_manager_snapshot.json")["Body"]
        except weed.client.exceptions.NoSuchKey:
            return []
        return json.loads(body.read())["checkpoint_results"]

    def stop_once_the_first_is_registered() -> None:  # Ray Train registers a checkpoint up to 2 s after its upload
        deadline = time.monotonic() + 30
        while not registered() and time.monotonic() < deadline:
            time.sleep(0.1)
        weed.stop()

    # budget 2 s: the server dies at the second checkpoint's upload (once the first is registered) and
    # stays down -> one clear error; the registered checkpoint stays
    monkeypatch.setenv(storage.RETRY_ENV, str(SHORT_BUDGET_S))
    proxy.arm(stop_once_the_first_is_registered, (checkpoints, 2))
    with pytest.raises(StorageUnavailableError) as failed:
        run_training(train_config(root, out, "outage.db"))
    assert proxy.fired.is_set()
    assert one_line_naming(failed.value, f"{out}/ray/align/checkpoint_", SHORT_BUDGET_S), str(failed.value)
    weed.start()
    assert [r["metrics"]["step"] for r in registered()] == [2]
    monkeypatch.delenv(storage.RETRY_ENV)

    # default budget: the rerun resumes from the registered checkpoint; the server dies at its next
    # checkpoint's upload and comes back OUTAGE_S later; the save waits it out and the run finishes
    outage = Outage(weed, OUTAGE_S)
    proxy.arm(outage, (checkpoints, 1))
    capfd.readouterr()
    summary = run_training(train_config(root, out, "outage.db"))
    assert proxy.fired.is_set() and outage.waited_out(time.monotonic())
    assert "resumed from step 2 " in "".join(capfd.readouterr())
    assert summary["metrics"]["step"] == reference["metrics"]["step"] == 6
    expected = read_state_dict(reference["model_dir"])
    got = read_state_dict(download(summary["model_dir"], root / "outage-model"))
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst <= 1e-5, worst
