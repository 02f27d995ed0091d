"""`bitllava pack`, run as users run it: a tiny checkpoint, bad input, and the 1b preset."""

import json
import os
import subprocess
import sys

import pytest
import torch

from model.checkpoint import save_model
from model.packed.packed_checkpoint import load_packed
from model.presets import describe

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")


def pack(*args, check=True, timeout=600):
    proc = subprocess.run([BIN, "pack", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bitllava pack {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_pack_a_checkpoint_and_load_it(tiny_mm, tmp_path):
    model, tokenizer, processor = tiny_mm
    save_model(str(tmp_path / "m"), model, tokenizer, processor)
    report = json.loads(pack(str(tmp_path / "m"), str(tmp_path / "p"), "--format", "1.6bit").stdout)
    assert report["format"] == "1.6bit" and report["source"] == str(tmp_path / "m")
    assert report["bitlinear_bits_per_weight"] <= 1.61
    assert report["folder_bytes"] < report["bf16_bytes"]
    loaded = load_packed(str(tmp_path / "p"))
    assert loaded.multimodal and loaded.model.config.packing["format"] == "1.6bit"


def test_pack_bad_input_exits_2_with_the_reason(tiny_mm, tmp_path):
    proc = pack(str(tmp_path / "nope"), str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "not a model folder" in proc.stderr
    proc = pack(str(tmp_path / "out"), "--preset", "7b", check=False)
    assert proc.returncode == 2 and "unknown preset '7b'" in proc.stderr
    proc = pack(str(tmp_path / "a"), str(tmp_path / "b"), "--format", "3bit", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.slow
def test_pack_1b_preset_random_weights(tmp_path):
    """The 1b shapes (1.07B BitLinear weights): bits per weight and sizes, both formats; the 2-bit one loads."""
    info = describe("1b")
    for fmt, limit in (("2bit", 2.0), ("1.6bit", 1.61)):
        out = tmp_path / fmt
        report = json.loads(pack("--preset", "1b", str(out), "--format", fmt).stdout)
        assert report["bitlinear_weights"] == info["bitlinear_weights"] == 1_073_741_824
        assert report["bitlinear_bits_per_weight"] <= limit
        assert report["bf16_bytes"] == 2 * info["total_params"]
        # block linears packed, the rest (embedding, CLIP ViT-L, projector) in bf16
        other_bf16 = 2 * (info["total_params"] - info["bitlinear_weights"])
        overhead = 8_000_000  # tokenizer files (about 3.5 MB for OLMo), config, safetensors header
        assert report["folder_bytes"] < other_bf16 + report["bitlinear_weights"] * limit / 8 + overhead
        if fmt == "2bit":
            loaded = load_packed(str(out))
            with torch.no_grad():
                logits = loaded.model(torch.tensor([[510, 5347, 273]])).logits
            assert logits.shape == (1, 3, 50280) and torch.isfinite(logits).all()
            del loaded
        for f in out.iterdir():
            f.unlink()  # keep the temp disk small
