"""`bitllava serve`, run as users run it: the packaged Serve config on a new local Ray cluster, an API
key from the environment, the OpenAI client against the printed URL, Ctrl-C to stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests
import yaml

from model.packed.packed_checkpoint import save_packed
from model.presets import build_from_preset
from serve.app import default_config_path

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")


def test_serve_refuses_a_folder_that_is_not_a_packed_model(tmp_path):
    proc = subprocess.run([BIN, "serve", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a model folder" in proc.stderr
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: []\n")
    proc = subprocess.run([BIN, "serve", str(tmp_path), "--config", str(bad)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "exactly one application" in proc.stderr


def test_serve_reads_the_configs_model_relative_to_the_working_directory(tmp_path):
    """Without --model the Serve config's args.model is served; a relative one means the user's folder."""
    config = yaml.safe_load(open(default_config_path()))
    config["applications"][0]["args"]["model"] = "packed"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([BIN, "serve", "--config", "serve.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and str(tmp_path / "packed") in proc.stderr, proc.stderr


@pytest.mark.slow
def test_bitllava_serve_until_ctrl_c(tmp_path):
    packed = tmp_path / "packed"
    save_packed(str(packed), *build_from_preset("tiny", seed=0))
    config = yaml.safe_load(open(default_config_path()))
    config["applications"][0]["args"]["api_key_env"] = "BITLLAVA_TEST_API_KEY"
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    env = {**os.environ, "BITLLAVA_TEST_API_KEY": "cli-key"}
    proc = subprocess.Popen([BIN, "serve", str(packed), "--config", str(config_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        info = None
        while info is None and time.time() < deadline and proc.poll() is None:
            info = next((json.loads(line) for line in list(lines) if line.startswith('{"url"')), None)
            time.sleep(0.5)
        assert info is not None, "bitllava serve did not print its URL:\n" + "".join(lines[-50:])
        assert info["url"] == f"http://127.0.0.1:{port}" and info["model_name"] == "bitllava"

        client = openai.OpenAI(base_url=info["openai_base_url"], api_key="cli-key", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="bitllava", messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=5)
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
        refused = requests.post(f"{info['url']}/v1/chat/completions", timeout=60,
                                json={"model": "bitllava", "messages": [{"role": "user", "content": "Hello"}]})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines[-50:])
    assert any("shutting down" in line for line in lines)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=10)
