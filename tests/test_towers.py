"""Vision towers (`model.towers`): CLIP and SigLIP folders as `save_pretrained` writes them, chosen by their
config; a SigLIP tower's features equal transformers' own SiglipVisionModel output for the same weights, its
processor resizes without a crop, and the patch count, processor and store fingerprint follow the tower."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import SiglipVisionModel

from model.assemble import init_model
from model.checkpoint import load_model, load_vision_tower, save_model
from model.towers import build_image_processor, num_patches, pretrained_vision_config, processor_identity
from model.towers.clip import clip_vit_l14_config
from model.towers.siglip import SiglipImageProcessorPil, siglip_so400m_config
from model.vision import preprocess_images
from tests.backbone_folders import write_tower_folder


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    return write_tower_folder(str(tmp_path_factory.mktemp("siglip") / "tower"), "siglip", seed=4)


def test_siglip_features_equal_transformers_own_model(siglip_folder, tmp_path):
    model, tokenizer, processor = init_model("tiny", vision=siglip_folder)
    assert type(model.vision_tower).__name__ == "SiglipVisionModel"
    assert model.config.num_image_tokens == 25  # (60 / 12)^2 patches, no CLS token
    assert model.multi_modal_projector.linear_1.in_features == 40  # the projector follows the tower's width
    reference = SiglipVisionModel.from_pretrained(siglip_folder).eval()  # with its pooling head, as published
    pixels = preprocess_images([Image.effect_noise((70, 50), 80).convert("RGB")], processor)
    with torch.no_grad():
        want = reference(pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(model.encode_images(pixels), want)
    # saved and loaded: the same tower, processor and features (what preprocessing's features mode runs)
    save_model(str(tmp_path / "model"), model, tokenizer, processor)
    loaded = load_model(str(tmp_path / "model"))
    assert isinstance(loaded.image_processor, SiglipImageProcessorPil)
    tower, config = load_vision_tower(str(tmp_path / "model"))
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_images(pixels), want)
        assert torch.equal(tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer], want)


def test_siglip_processor_pads_then_resizes_without_a_crop():
    processor = build_image_processor(siglip_so400m_config(384))
    assert num_patches(siglip_so400m_config(384)) == 729 and num_patches(clip_vit_l14_config(336)) == 576
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels = preprocess_images([wide], processor)
    assert pixels.shape == (1, 3, 384, 384)
    # padded with the mean colour (127, 127, 127 -> about 0 after normalising), the red band kept whole
    top, middle = pixels[0, :, 10, 192], pixels[0, :, 192, 192]
    assert torch.allclose(top, torch.full((3,), -0.0039), atol=1e-3)
    assert torch.allclose(middle, torch.tensor([1.0, -1.0, -1.0]), atol=1e-3)
    # the published processor on the padded square gives the same values
    square = Image.new("RGB", (200, 200), (127, 127, 127))
    square.paste(wide, (0, 50))
    published = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert torch.equal(pixels, published(images=[square], return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_either_kind_of_folder_sets_the_tower(kind, tmp_path):
    for full in (False, True):  # the vision model alone, or the hub's whole two-tower checkpoint
        folder = write_tower_folder(str(tmp_path / f"{kind}-{full}"), kind, seed=1, full_model=full)
        config = pretrained_vision_config(folder)
        assert config.model_type == f"{kind}_vision_model"
        model, _, processor = init_model("tiny", vision=folder)
        assert model.config.vision_config.model_type == config.model_type
        assert model.config.num_image_tokens == (16 if kind == "clip" else 25)
        saved = load_file(f"{folder}/model.safetensors")
        prefix = "vision_model." if full else ""
        key = next(k for k in model.vision_tower.state_dict() if k.endswith("encoder.layers.1.mlp.fc1.weight"))
        assert torch.equal(model.vision_tower.state_dict()[key], saved[prefix + key])


def test_an_unsupported_tower_is_named(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ValueError, match=r"vision tower model_type 'vit' is not supported.*CLIP and SigLIP"):
        init_model("tiny", vision=str(tmp_path / "vit"))


def test_store_fingerprints_name_the_processor_and_keep_clips():
    clip = processor_identity(build_image_processor(clip_vit_l14_config(336)))
    # a CLIP store's fingerprint is what it was before towers had a choice (stores stay valid)
    assert clip == {"size": [("shortest_edge", 336)], "crop_size": [("height", 336), ("width", 336)],
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711]}
    siglip = processor_identity(build_image_processor(siglip_so400m_config(384)))
    assert siglip["processor"] == "SiglipImageProcessorPil" and siglip["do_center_crop"] is False
    assert siglip != clip and np.allclose(siglip["image_mean"], 0.5)
