"""Loading the published OLMo-Bitnet-1B layout and this project's folders, strictly."""

import json
import shutil

import pytest
import torch

from model.checkpoint import load_model, save_model
from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
from model.tokenizer import olmo_tokenizer_file

# The published config.json's fields (NousResearch/OLMo-Bitnet-1B), at a small size.
PUBLISHED_CONFIG = {
    "activation_type": "swiglu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["OLMoForCausalLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": False,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "sequential", "clip_qkv": None,
    "d_model": 64, "embedding_dropout": 0.0, "embedding_size": 50304, "eos_token_id": 50279,
    "flash_attention": False, "include_bias": False, "inference_mode": True, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "max_sequence_length": 2048, "mlp_hidden_size": None, "mlp_ratio": 8, "model_type": "olmo",
    "multi_query_attention": False, "n_heads": 4, "n_kv_heads": None, "n_layers": 2, "pad_token_id": 1,
    "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True, "rope_full_precision": True,
    "scale_logits": False, "ternary": True, "use_cache": True, "vocab_size": 50280, "weight_tying": True,
}


@pytest.fixture
def published(tmp_path):
    """A folder in the published layout: OLMo config.json, fp32 pytorch_model.bin, tokenizer.json."""
    torch.manual_seed(1)
    source = OLMoBitNetForCausalLM(OLMoBitNetConfig.from_olmo_config(PUBLISHED_CONFIG)).eval()
    folder = tmp_path / "olmo-bitnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    torch.save(source.state_dict(), folder / "pytorch_model.bin")
    shutil.copy(olmo_tokenizer_file(), folder / "tokenizer.json")
    return folder, source


def test_published_layout_keys_are_olmos(published):
    folder, _ = published
    keys = set(torch.load(folder / "pytorch_model.bin", weights_only=True))
    assert "model.transformer.wte.weight" in keys and "model.transformer.ln_f.weight" in keys
    for name in ("att_proj", "attn_out", "ff_proj", "ff_out", "attn_norm", "ff_norm"):
        assert f"model.transformer.blocks.1.{name}.weight" in keys


def test_published_checkpoint_logits_equal_source(published):
    folder, source = published
    loaded = load_model(str(folder))
    assert loaded.layout == "olmo_published" and not loaded.multimodal
    assert loaded.tokenizer.eos_token_id == 50279 and loaded.tokenizer.pad_token_id == 1
    ids = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]])
    assert torch.equal(loaded.model(ids).logits, source(ids).logits)


def test_published_safetensors_variant(published, tmp_path):
    from safetensors.torch import save_file

    folder, source = published
    (folder / "pytorch_model.bin").unlink()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, folder / "model.safetensors")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(load_model(str(folder)).model(ids).logits, source(ids).logits)


def test_wrong_key_names_are_named(published):
    folder, source = published
    state = {k.replace("att_proj", "attn_proj"): v for k, v in source.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing: .*blocks.0.att_proj.weight.*unexpected: .*attn_proj"):
        load_model(str(folder))


def test_wrong_shapes_are_named(published):
    folder, source = published
    state = dict(source.state_dict())
    state["model.transformer.blocks.1.ff_out.weight"] = torch.zeros(64, 100)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"wrong shape: model.transformer.blocks.1.ff_out.weight \(64, 100\)"):
        load_model(str(folder))


def test_unsupported_architecture_is_refused(published):
    folder, _ = published
    (folder / "config.json").write_text(json.dumps({**PUBLISHED_CONFIG, "activation_type": "gelu"}))
    with pytest.raises(ValueError, match="activation_type"):
        load_model(str(folder))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmo_bitnet", "d_model": 64, "n_heads": 4}))
    with pytest.raises(ValueError, match="holds no weights"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="not a model folder"):
        load_model(str(tmp_path / "missing" / "dir"))


def test_multimodal_folder_round_trip(tiny_mm, tmp_path):
    model, tokenizer, processor = tiny_mm
    save_model(str(tmp_path), model, tokenizer, processor)
    loaded = load_model(str(tmp_path))
    assert loaded.layout == "bitllava" and loaded.multimodal
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert loaded.image_processor.crop_size["height"] == 64
