"""Packed models on the tiny preset: same logits and greedy outputs as the unpacked model, the
folder format, and every bad input (bad checkpoints, damaged packed folders)."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from components.pack import PackConfig, run_pack
from model.chat import generate_reply
from model.checkpoint import load_model, save_model
from model.packed.packed_checkpoint import WEIGHTS, load_packed, sha256_file
from model.packed.packed_linear import PackedBitLinear, pack_bitlinears
from model.packed.packed_model import Int8Head
from model.presets import build_from_preset
from model.vision import preprocess_images

PROMPT = "What colour is the shape in the picture?"


def round_to_bf16(model):
    """Make every weight exactly representable in bf16, as a packed folder stores non-ternary weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    round_to_bf16(model.eval())
    folder = str(tmp_path / "checkpoint")
    save_model(folder, model, tokenizer, processor)
    return folder


@pytest.fixture
def image():
    img = Image.new("RGB", (64, 48), (20, 200, 40))
    for x in range(10, 30):
        for y in range(10, 30):
            img.putpixel((x, y), (230, 20, 20))
    return img


def pack_folder(checkpoint, out, fmt="2bit"):
    return run_pack(PackConfig(out=str(out), checkpoint=checkpoint, format=fmt))


def model_inputs(loaded, image):
    reply_ids = loaded.tokenizer("a red square on green", add_special_tokens=False)["input_ids"]
    n_img = loaded.model.config.num_image_tokens
    ids = [loaded.model.config.image_token_id] * n_img + reply_ids
    pixels = preprocess_images([image], loaded.image_processor)
    return torch.tensor([ids]), pixels


@pytest.mark.parametrize("fmt", ["2bit", "1.6bit"])
def test_packed_logits_and_greedy_outputs_equal_unpacked(tiny_checkpoint, tmp_path, image, fmt):
    report = pack_folder(tiny_checkpoint, tmp_path / "packed", fmt)
    dense = load_model(tiny_checkpoint)
    packed = load_packed(report["out"], dtype=torch.float32)
    assert packed.layout == "bitllava" and packed.multimodal
    assert sum(isinstance(m, PackedBitLinear) for m in packed.model.modules()) == 8
    ids, pixels = model_inputs(dense, image)
    with torch.no_grad():
        want = dense.model(ids, pixel_values=pixels).logits
        got = packed.model(ids, pixel_values=pixels).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        text_ids = ids[:, -5:]
        torch.testing.assert_close(packed.model(text_ids).logits, dense.model(text_ids).logits, rtol=1e-5, atol=1e-5)
        kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert torch.equal(packed.model.generate(ids, pixel_values=pixels, **kwargs),
                           dense.model.generate(ids, pixel_values=pixels, **kwargs))
    # the chat path (model/chat.py) takes the packed LoadedModel as it is
    reply_dense = generate_reply(dense, PROMPT, [image], max_new_tokens=16)
    reply_packed = generate_reply(packed, PROMPT, [image], max_new_tokens=16)
    assert reply_packed.token_ids == reply_dense.token_ids and reply_packed.text == reply_dense.text


def test_kernel_and_reference_backends_give_identical_logits(tiny_checkpoint, tmp_path):
    report = pack_folder(tiny_checkpoint, tmp_path / "packed")
    fast = load_packed(report["out"], dtype=torch.float32)
    slow = load_packed(report["out"], dtype=torch.float32, backend="reference")
    ids = torch.tensor([[5, 17, 300, 42, 9, 12, 600, 77]])
    with torch.no_grad():
        assert torch.equal(fast.model(ids).logits, slow.model(ids).logits)


def test_in_memory_packing_matches_the_training_forward(tiny_llm):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        want = tiny_llm(ids).logits
        assert pack_bitlinears(tiny_llm) == 8
        got = tiny_llm(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_and_int8_head_variants_stay_close(tiny_checkpoint, tmp_path):
    report = pack_folder(tiny_checkpoint, tmp_path / "packed")
    ref = load_packed(report["out"], dtype=torch.float32)
    bf16 = load_packed(report["out"])  # the default: bf16 activations, bf16 head kernel on CPU
    int8 = load_packed(report["out"], dtype=torch.float32, head="int8")
    assert isinstance(int8.model.language_model.int8_head, Int8Head)
    ids = torch.randint(0, 700, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.model(ids).logits
        scale = float(want.abs().max())
        for variant, tol in ((bf16, 0.05), (int8, 0.02)):
            got = variant.model(ids).logits.float()
            assert float((got - want).abs().max()) < tol * scale
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_report_counts_bits_and_bytes(tiny_checkpoint, tmp_path):
    dense_params = sum(p.numel() for p in load_model(tiny_checkpoint).model.parameters())
    for fmt, limit in (("2bit", 2.0), ("1.6bit", 1.61)):
        out = tmp_path / fmt
        report = pack_folder(tiny_checkpoint, out, fmt)
        assert report["format"] == fmt and report["bitlinear_layers"] == 8
        assert report["bitlinear_weights"] == 2 * (128 * 384 + 128 * 128 + 128 * 1024 + 512 * 128)
        assert report["bitlinear_bits_per_weight"] <= limit
        assert report["folder_bytes"] == sum(f.stat().st_size for f in out.iterdir())
        assert report["bf16_bytes"] == 2 * dense_params
        config = json.loads((out / "config.json").read_text())
        assert config["packing"]["format"] == fmt
        assert config["packing"]["files"][WEIGHTS]["sha256"] == sha256_file(str(out / WEIGHTS))


def test_published_olmo_layout_packs_to_an_llm_folder(tmp_path):
    from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
    from model.tokenizer import olmo_tokenizer_file
    from tests.test_checkpoint import PUBLISHED_CONFIG

    torch.manual_seed(2)
    source = round_to_bf16(OLMoBitNetForCausalLM(OLMoBitNetConfig.from_olmo_config(PUBLISHED_CONFIG)).eval())
    folder = tmp_path / "olmo-bitnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    torch.save(source.state_dict(), folder / "pytorch_model.bin")
    (folder / "tokenizer.json").write_bytes(open(olmo_tokenizer_file(), "rb").read())
    report = pack_folder(str(folder), tmp_path / "packed")
    assert report["layout"] == "olmo_bitnet"
    packed = load_packed(report["out"], dtype=torch.float32)
    assert packed.layout == "olmo_bitnet" and not packed.multimodal
    assert packed.tokenizer.eos_token_id == 50279
    ids = torch.tensor([packed.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(packed.model(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


# --- bad checkpoints -------------------------------------------------------------------------

def rewrite_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_checkpoint_missing_bitlinear_weights(tiny_checkpoint, tmp_path):
    rewrite_weights(tiny_checkpoint, lambda s: s.pop("language_model.model.transformer.blocks.1.ff_proj.weight"))
    with pytest.raises(ValueError, match=r"cannot pack .*missing: language_model.model.transformer.blocks.1.ff_proj"):
        pack_folder(tiny_checkpoint, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_checkpoint_bitlinear_weight_of_wrong_shape(tiny_checkpoint, tmp_path):
    key = "language_model.model.transformer.blocks.0.att_proj.weight"
    rewrite_weights(tiny_checkpoint, lambda s: s.__setitem__(key, torch.zeros(128, 128)))
    with pytest.raises(ValueError, match=r"wrong shape: .*att_proj.weight \(128, 128\) \(expected \(384, 128\)\)"):
        pack_folder(tiny_checkpoint, tmp_path / "packed")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        pack_folder(str(empty), tmp_path / "a")
    (empty / "config.json").write_text(json.dumps({"model_type": "olmo_bitnet", "d_model": 64, "n_heads": 4}))
    with pytest.raises(ValueError, match="holds no weights"):
        pack_folder(str(empty), tmp_path / "b")
    (empty / "config.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ValueError, match="neither a bitllava model"):
        pack_folder(str(empty), tmp_path / "c")
    with pytest.raises(ValueError, match="not a model folder"):
        pack_folder(str(tmp_path / "does-not-exist"), tmp_path / "d")


def test_packing_a_packed_folder_or_into_a_used_folder(tiny_checkpoint, tmp_path):
    out = pack_folder(tiny_checkpoint, tmp_path / "packed")["out"]
    with pytest.raises(ValueError, match="already a packed model folder"):
        pack_folder(out, tmp_path / "again")
    with pytest.raises(ValueError, match="exists and is not empty"):
        pack_folder(tiny_checkpoint, out)
    assert run_pack(PackConfig(out=out, checkpoint=tiny_checkpoint, format="1.6bit", overwrite=True))["format"] == "1.6bit"
    with pytest.raises(ValueError, match="not a packed model folder"):  # --overwrite never deletes other folders
        run_pack(PackConfig(out=tiny_checkpoint + "/", checkpoint=out, overwrite=True))
    with pytest.raises(ValueError, match="exactly one of"):
        PackConfig(out="x", checkpoint=tiny_checkpoint, preset="tiny")
    with pytest.raises(ValueError, match="unknown packing format"):
        PackConfig(out="x", checkpoint=tiny_checkpoint, format="4bit")


# --- damaged packed folders ------------------------------------------------------------------

@pytest.fixture
def packed_folder(tiny_checkpoint, tmp_path):
    return pack_folder(tiny_checkpoint, tmp_path / "packed")["out"]


def test_truncated_weights_are_detected(packed_folder):
    path = os.path.join(packed_folder, WEIGHTS)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match=rf"damaged: {WEIGHTS} is {size - 1000} bytes but config.json records {size}"):
        load_packed(packed_folder)
    with pytest.raises(ValueError, match="not a readable safetensors file|pack the model again"):
        load_packed(packed_folder, verify=False)


def test_altered_bytes_are_detected(packed_folder):
    path = os.path.join(packed_folder, WEIGHTS)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ValueError, match=f"the sha256 of {WEIGHTS} differs"):
        load_packed(packed_folder)


def test_missing_file_is_detected(packed_folder):
    os.remove(os.path.join(packed_folder, "tokenizer.json"))
    with pytest.raises(ValueError, match="incomplete: tokenizer.json is missing"):
        load_packed(packed_folder)


def test_unpacked_or_broken_config_is_refused(packed_folder, tiny_checkpoint):
    with pytest.raises(ValueError, match="not a packed model folder"):
        load_packed(tiny_checkpoint)
    config_path = os.path.join(packed_folder, "config.json")
    config = json.loads(open(config_path).read())
    config["packing"]["tensors"]["language_model.model.transformer.blocks.0.ff_out"] = [128, 256]
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"blocks.0.ff_out is recorded as \[128, 256\] but the config needs \[128, 512\]"):
        load_packed(packed_folder)
    open(config_path, "w").write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_packed(packed_folder)


def reseal(folder):
    """Recompute config.json's checksums, as a buggy writer would (so the tensor checks must catch it)."""
    config_path = os.path.join(folder, "config.json")
    config = json.loads(open(config_path).read())
    path = os.path.join(folder, WEIGHTS)
    config["packing"]["files"][WEIGHTS] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    open(config_path, "w").write(json.dumps(config))


def test_sealed_but_inconsistent_tensors_are_refused(packed_folder):
    name = "language_model.model.transformer.blocks.1.attn_out"
    rewrite_weights(packed_folder, lambda s: s.__setitem__(name + ".weight_packed", torch.zeros(128, 16, dtype=torch.uint8)))
    reseal(packed_folder)
    with pytest.raises(ValueError, match=r"attn_out.weight_packed is torch.uint8 \(128, 16\), expected uint8 \(128, 32\)"):
        load_packed(packed_folder)
    rewrite_weights(packed_folder, lambda s: s.pop(name + ".weight_scale"))
    reseal(packed_folder)
    with pytest.raises(ValueError, match=r"lacks packed BitLinear tensors: .*attn_out.weight_scale"):
        load_packed(packed_folder)
