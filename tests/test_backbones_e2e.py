"""A backbone and a tower other than OLMo-Bitnet and CLIP through the whole path, as a user runs it: a tiny
BitNet b1.58 (2B-4T architecture: GQA, SubLN, squared ReLU, an `<image>` row added to the tied embedding) LLM
folder in transformers' published layout and a tiny SigLIP tower folder (no CLS token, 25 patches, its own
processor), `bitllava model init --llm --vision` on them (relative paths, from the user's folder), stores of
cached SigLIP features, a few align and instruct steps on 2 Ray Train + DeepSpeed CPU workers, packing, and
`bitllava serve` answering an image chat through the `openai` client. One end-to-end run for both
capabilities; every family's load, compose, train step and pack parity (Qwen2's biases and spare row
included): test_backbones.py; the towers' features and processors: test_towers.py."""

import base64
import io
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
import ray
import torch
from PIL import Image

from components.data.preprocess import PreprocessConfig
from components.data.synth import SynthConfig, synthesize
from components.pack import PackConfig, run_pack
from components.train.config import load_train_config
from components.train.run import run_training
from model.checkpoint import load_model, read_state_dict
from model.packed.packed_checkpoint import read_packing
from tests.backbone_folders import write_llm_folder, write_tower_folder
from tests.test_train_nonfinite import features_store

pytestmark = pytest.mark.slow
BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines", "configs", "train")


def serve_and_ask(packed: str, cwd, image: Image.Image) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([BIN, "serve", packed, "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline, info = time.time() + 300, None
        while info is None and time.time() < deadline and proc.poll() is None:
            info = next((json.loads(line) for line in list(lines) if line.startswith('{"url"')), None)
            time.sleep(0.5)
        assert info is not None, "bitllava serve did not print its URL:\n" + "".join(lines[-50:])
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        client = openai.OpenAI(base_url=info["openai_base_url"], api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=info["model_name"], max_tokens=6, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "What color is the shape?"}]}])
        assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 25  # 25 SigLIP patches
        return reply.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_backbone_and_a_tower_init_train_pack_and_serve(tmp_path):
    family = "bitnet"
    write_llm_folder(str(tmp_path / "llm"), family, seed=2)
    write_tower_folder(str(tmp_path / "tower"), "siglip", seed=2)
    init = subprocess.run([BIN, "model", "init", "--preset", "tiny", "--llm", "llm", "--vision", "tower", "--out", "base"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr[-3000:]
    summary = json.loads(init.stdout.strip().splitlines()[-1])
    assert summary["backbone"] == family and summary["model_dir"] == str(tmp_path / "base")
    assert summary["vision_tower"] == "siglip_vision_model" and summary["image_tokens"] == 25
    base = str(tmp_path / "base")

    synth = synthesize(SynthConfig(out=str(tmp_path / "synth"), records=24, eval=0, seed=3))
    for phase, source in (("align", "cc595k"), ("instruct", "instruct")):
        features_store(PreprocessConfig(source=source, json=synth[source]["json"], images=synth[source]["images"],
                                        out=str(tmp_path / f"store-{phase}"), phase=phase, encode="features",
                                        model=base, shard_records=8))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        align = run_training(load_train_config(os.path.join(CONFIGS, "tiny-align.yaml"), epochs=1, init=base,
                                               data=str(tmp_path / "store-align"), out=str(tmp_path / "run-align")))
        instruct = run_training(load_train_config(os.path.join(CONFIGS, "tiny-instruct.yaml"), epochs=1,
                                                  init=align["model_dir"], data=str(tmp_path / "store-instruct"),
                                                  out=str(tmp_path / "run-instruct")))
    finally:
        ray.shutdown()
    before, aligned, tuned = (read_state_dict(d) for d in (base, align["model_dir"], instruct["model_dir"]))
    for name in before:  # align: the projector only; instruct: the LLM too
        assert (not torch.equal(before[name], aligned[name])) == name.startswith("multi_modal_projector."), name
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(aligned[q], tuned[q])
    assert all(torch.isfinite(v).all() for v in tuned.values())
    assert load_model(instruct["model_dir"]).model.config.text_config.model_type == family

    packed = str(tmp_path / "packed")
    run_pack(PackConfig(out=packed, checkpoint=instruct["model_dir"]))
    assert read_packing(packed)[1]["backbone"] == family
    image = Image.new("RGB", (64, 64), (20, 200, 40))
    assert isinstance(serve_and_ask("packed", tmp_path, image), str)
