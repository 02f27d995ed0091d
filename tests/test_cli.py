"""The bitllava command line, run as users run it."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from model.checkpoint import save_model

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")


def run(*args, check=True):
    proc = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"bitllava {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_model_info_1b_exact_counts():
    info = json.loads(run("model", "info", "--preset", "1b", "--json").stdout)
    assert info["llm_params"] == 1_176_832_000
    assert info["bitlinear_weights"] == 1_073_741_824
    assert info["vision_params"] == 303_507_456  # CLIP ViT-L/14-336 vision model
    assert info["projector_params"] == 1024 * 2048 + 2048 + 2048 * 2048 + 2048
    assert info["total_params"] == info["llm_params"] + info["vision_params"] + info["projector_params"]
    assert info["image_tokens"] == 576


def test_model_info_unknown_preset():
    proc = run("model", "info", "--preset", "7b", "--json", check=False)
    assert proc.returncode == 2 and "unknown preset '7b'" in proc.stderr


def test_generate_json_from_multimodal_folder(tiny_mm, tmp_path):
    model, tokenizer, processor = tiny_mm
    save_model(str(tmp_path / "m"), model, tokenizer, processor)
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 60), (0, 200, 0)).save(img)
    out = run("generate", "--model", str(tmp_path / "m"), "--image", str(img), "--image", str(img),
              "--prompt", "What is shown?", "--max-new-tokens", "5", "--greedy", "--json")
    reply = json.loads(out.stdout)
    assert set(reply) == {"text", "token_ids"} and 1 <= len(reply["token_ids"]) <= 5
    assert reply["text"] == tokenizer.decode(reply["token_ids"], skip_special_tokens=True).strip()


def test_generate_bad_inputs(tiny_mm, tmp_path):
    model, tokenizer, processor = tiny_mm
    save_model(str(tmp_path / "m"), model, tokenizer, processor)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    proc = run("generate", "--model", str(tmp_path / "m"), "--image", str(bad), "--prompt", "x", check=False)
    assert proc.returncode == 2 and "cannot read image" in proc.stderr
    proc = run("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", check=False)
    assert proc.returncode == 2 and "not a model folder" in proc.stderr
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    proc = run("generate", "--model", str(tmp_path / "m"), "--image", str(img), "--prompt", "<image> <image>",
               check=False)
    assert proc.returncode == 2 and "2 <image> placeholders but 1 images" in proc.stderr


def test_generate_text_only_from_published_llm(tmp_path):
    from tests.test_checkpoint import PUBLISHED_CONFIG  # noqa: the same small published layout
    import shutil

    import torch

    from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
    from model.tokenizer import olmo_tokenizer_file

    torch.manual_seed(0)
    source = OLMoBitNetForCausalLM(OLMoBitNetConfig.from_olmo_config(PUBLISHED_CONFIG)).eval()
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    shutil.copy(olmo_tokenizer_file(), tmp_path / "tokenizer.json")
    reply = json.loads(run("generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "4",
                           "--greedy", "--json").stdout)
    ids = torch.tensor([[12092]])  # "Hello" in OLMo's tokenizer
    expected = source.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=50279, pad_token_id=1)
    assert reply["token_ids"] == expected[0, 1:].tolist()


@pytest.mark.slow
def test_demo_learns_its_caption(tmp_path):
    out = run("demo", "--model-only", "--out", str(tmp_path))
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["learned"] and summary["reply"] == summary["caption"]
    assert summary["last_loss"] < summary["first_loss"] / 5
