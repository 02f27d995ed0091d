"""`model.loading.load_any_model`: packed and checkpoint folders through one loader, greedy parity
between a packed folder and its checkpoint, and one-line errors for a hub id that cannot be fetched."""

import json
import os
import random
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from components.pack import PackConfig, run_pack
from components.synthetic_images import draw_scene, random_scene
from model.chat import generate_reply, user_turn
from model.checkpoint import resolve_model_dir, save_model
from model.conversation import prompt_ids
from model.loading import is_packed_folder, load_any_model
from model.packed.packed_linear import PackedBitLinear
from model.presets import build_from_preset
from model.vision import preprocess_images

HUB_ID = "bitllava-tests/no-such-model"


def bf16_exact(model):
    """Every weight exactly representable in bf16: a packed folder stores the non-ternary ones in bf16."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{seed: (checkpoint folder, packed folder)} of the tiny preset, packed as `bitllava pack` does."""
    root = tmp_path_factory.mktemp("loading")
    out = {}
    for seed in (0, 1):
        model, tokenizer, processor = build_from_preset("tiny", seed=seed)
        checkpoint = str(root / f"checkpoint-{seed}")
        save_model(checkpoint, bf16_exact(model), tokenizer, processor)
        out[seed] = (checkpoint, run_pack(PackConfig(out=str(root / f"packed-{seed}"), checkpoint=checkpoint))["out"])
    return out


def test_each_folder_kind_loads_through_one_call(folders, tmp_path):
    checkpoint, packed = folders[0]
    assert not is_packed_folder(checkpoint) and is_packed_folder(packed)
    dense, small = load_any_model(checkpoint), load_any_model(packed)
    assert dense.layout == small.layout == "bitllava" and dense.multimodal and small.multimodal
    assert not any(isinstance(m, PackedBitLinear) for m in dense.model.modules())
    assert sum(isinstance(m, PackedBitLinear) for m in small.model.modules()) == 8
    assert dense.model.dtype == small.model.dtype == torch.float32  # the default of both kinds
    assert load_any_model(packed, dtype=torch.bfloat16).model.dtype == torch.bfloat16
    llm = run_pack(PackConfig(out=str(tmp_path / "llm"), preset="tiny", llm_only=True))["out"]
    loaded = load_any_model(llm)
    assert loaded.layout == "olmo_bitnet" and not loaded.multimodal and loaded.image_processor is None


def test_packed_folder_detection_tolerates_odd_configs(tmp_path):
    for name, text in (("list", "[1, 2]"), ("broken", "{not json"), ("no-packing", '{"model_type": "bitllava"}'),
                       ("packing-not-a-dict", '{"packing": "2bit"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        assert not is_packed_folder(str(tmp_path / name)), name
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    assert not is_packed_folder(str(tmp_path / "binary"))
    assert not is_packed_folder(str(tmp_path / "absent")) and not is_packed_folder(HUB_ID)


@pytest.mark.parametrize("seed, scene, prompt", [
    (0, 0, "What is shown?"),
    (1, 2, "What is shown?"),
    (1, 0, "What is shown?"),
])
def test_packed_greedy_ids_equal_the_checkpoint(folders, seed, scene, prompt):
    """The packed model computes the training forward's function (int8 activations, ternary codes),
    so with float32 activations (load_any_model's default) greedy decoding picks the same ids."""
    checkpoint, packed = folders[seed]
    image = draw_scene(random_scene(random.Random(scene)))
    dense, small = load_any_model(checkpoint), load_any_model(packed)
    want = generate_reply(dense, prompt, [image], max_new_tokens=8)
    got = generate_reply(small, prompt, [image], max_new_tokens=8)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert len(want.token_ids) == 8 or want.token_ids[-1] == dense.tokenizer.eos_token_id
    # and the logits along the whole generated sequence agree, not only their argmax
    config = dense.model.config
    ids = prompt_ids([user_turn(prompt, 1)], dense.tokenizer, config.template, 1, config.num_image_tokens)
    full = torch.tensor([ids + want.token_ids])
    pixels = preprocess_images([image], dense.image_processor)
    with torch.no_grad():
        torch.testing.assert_close(small.model(full, pixel_values=pixels).logits,
                                   dense.model(full, pixel_values=pixels).logits, rtol=1e-5, atol=1e-5)


# --- hub ids that cannot be fetched ---------------------------------------------------------------

def _assert_one_line(err: ValueError, reason: str) -> None:
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"could not download {HUB_ID!r} from the Hugging Face hub (")
    assert message.endswith("); offline, give a local model folder")
    assert reason in message


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def test_offline_hub_id_is_one_line(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    with pytest.raises(ValueError) as info:
        load_any_model(HUB_ID)
    _assert_one_line(info.value, "HF_HUB_OFFLINE is set and the model is not in the local cache")


def test_unreachable_hub_is_one_line(empty_hub_cache, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.setattr(empty_hub_cache, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ValueError) as info:
        resolve_model_dir(HUB_ID)
    _assert_one_line(info.value, "Connection")


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self):  # what the hub answers for a repository that does not exist
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_missing_repository_is_one_line(empty_hub_cache, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(empty_hub_cache, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ValueError) as info:
            resolve_model_dir(HUB_ID)
    finally:
        server.shutdown()
        server.server_close()
    _assert_one_line(info.value, "no such repository, or it is private")


def test_cli_offline_hub_id_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("BITLLAVA_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", HUB_ID, "--prompt", "x"],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bitllava: error:")]
    assert errors == [f"bitllava: error: could not download {HUB_ID!r} from the Hugging Face hub (HF_HUB_OFFLINE is "
                      "set and the model is not in the local cache); offline, give a local model folder"], proc.stderr
