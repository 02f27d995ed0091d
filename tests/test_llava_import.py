"""The paper's released model in its published LLaVA layout (a tiny random stand-in: the real one is
gated): `bitllava model import-llava` maps its key families into this project's folder, the imported
model computes what the release's weights compute, it packs with identical greedy output, and a
checkpoint with an unknown or a missing tensor is refused with the tensor's name."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import CLIPVisionConfig

from components.pack import PackConfig, run_pack
from model.backbones.olmo_bitnet import OLMoBitNetConfig
from model.checkpoint import load_model
from model.llava_import import RELEASE_SUBFOLDER, import_llava_olmo_bitnet
from model.multimodal import BitLlavaConfig, BitLlavaForConditionalGeneration
from model.packed.packed_checkpoint import load_packed

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")
OLMO = dict(d_model=64, n_heads=4, n_layers=2, mlp_ratio=8, vocab_size=50280, embedding_size=50304,
            max_sequence_length=512, eos_token_id=50279, pad_token_id=1)
BACK = {  # this project's prefix -> the release's (LLaVA's LlavaMetaModel names)
    "language_model.model.transformer.": "model.transformer.",
    "language_model.lm_head.": "lm_head.",
    "multi_modal_projector.linear_1.": "model.mm_projector.0.",
    "multi_modal_projector.linear_2.": "model.mm_projector.2.",
    "vision_tower.": "model.vision_tower.vision_tower.vision_model.",
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(repository folder, the source model) in the release's layout: checkpoints/.../config.json + bf16 .bin."""
    root = tmp_path_factory.mktemp("intellabs") / "LlavaOLMoBitnet1B"
    tower_dir = root.parent / "clip-tiny"
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              patch_size=16, image_size=64, projection_dim=64, hidden_act="quick_gelu")
    vision.save_pretrained(tower_dir)
    torch.manual_seed(4)
    config = BitLlavaConfig(text_config=OLMoBitNetConfig(**OLMO, weight_tying=False), vision_config=vision,
                            image_token_id=50280)
    source = BitLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(p.bfloat16().float())
    state = {}
    for key, tensor in source.state_dict().items():
        prefix = next(p for p in BACK if key.startswith(p))
        state[BACK[prefix] + key[len(prefix):]] = tensor.bfloat16()
    state["lm_head.weight"] = state["lm_head.weight"][:50280].clone()  # a head over the real vocabulary
    folder = root / RELEASE_SUBFOLDER
    folder.mkdir(parents=True)
    torch.save(state, folder / "pytorch_model.bin")
    raw = {"architectures": ["LlavaOLMoBitnetForCausalLM"], "model_type": "llava_olmo_bitnet", **OLMO,
           "weight_tying": False, "activation_type": "swiglu", "block_type": "sequential", "ternary": True,
           "mm_vision_tower": str(tower_dir), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_hidden_size": 64,
           "mm_use_im_start_end": False, "tune_mm_mlp_adapter": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(raw))
    return root, source


def test_import_llava_as_a_user_runs_it_then_pack(release, tmp_path):
    root, source = release
    shutil.copytree(root, tmp_path / "LlavaOLMoBitnet1B")
    proc = subprocess.run([BIN, "model", "import-llava", "LlavaOLMoBitnet1B", "--out", "imported"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["model_dir"] == str(tmp_path / "imported")
    loaded = load_model(str(tmp_path / "imported"))
    assert loaded.multimodal and not loaded.model.config.text_config.weight_tying
    assert loaded.model.config.template == "v1" and loaded.model.config.image_token_id == 50280
    assert loaded.tokenizer.eos_token_id == 50279  # OLMo-Bitnet-1B's tokenizer: the release ships none
    config = loaded.model.config
    ids = torch.tensor([[5, 300, 12] + [50280] * config.num_image_tokens + [9, 640, 41]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = source(ids, pixel_values=pixels).logits
        assert torch.equal(loaded.model(ids, pixel_values=pixels).logits, want)
    run_pack(PackConfig(out=str(tmp_path / "packed"), checkpoint=str(tmp_path / "imported")))
    packed = load_packed(str(tmp_path / "packed"), dtype=torch.float32)
    with torch.no_grad():
        got = packed.model(ids, pixel_values=pixels).logits
        assert (got - want).abs().mean() < 1e-3
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(packed.model.generate(ids, pixel_values=pixels, **kwargs),
                           source.generate(ids, pixel_values=pixels, **kwargs))


@pytest.mark.parametrize("change, named", [
    (lambda s: s.update({"model.mm_projector.4.weight": torch.zeros(2, 2)}), "model.mm_projector.4.weight"),
    (lambda s: s.pop("model.vision_tower.vision_tower.vision_model.post_layernorm.weight"),
     "missing: vision_tower.post_layernorm.weight"),
    (lambda s: s.pop("model.transformer.blocks.1.ff_out.weight"), "language_model.model.transformer.blocks.1.ff_out"),
])
def test_an_unknown_or_missing_tensor_is_refused_by_name(release, tmp_path, change, named):
    root, _ = release
    copy = tmp_path / "release"
    shutil.copytree(root, copy)
    path = copy / RELEASE_SUBFOLDER / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match="fit no known LLaVA key family|missing") as err:
        import_llava_olmo_bitnet(str(copy))
    assert named in str(err.value)


def test_a_llava_config_it_cannot_run_is_refused(release, tmp_path):
    root, _ = release
    copy = tmp_path / "release"
    shutil.copytree(root, copy)
    path = copy / RELEASE_SUBFOLDER / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "image_aspect_ratio": "anyres"}))
    with pytest.raises(ValueError, match="image_aspect_ratio 'anyres' is unsupported"):
        import_llava_olmo_bitnet(str(copy))
