"""Import the paper's released model, IntelLabs/LlavaOLMoBitnet1B (a fork of the LLaVA code), into this
project's folder layout, so that `bitllava pack` and `bitllava serve` run it.

The release (gated) holds one bf16 `pytorch_model.bin` and its `config.json` under
`checkpoints/llava-LlavaOLMoBitnet1B-Run3-finetune/`, and no tokenizer: it uses OLMo-Bitnet-1B's. From
its loader code (LLaVA's `LlavaMetaModel`) the state dict holds these key families, mapped here:

    model.transformer.*                              -> language_model.model.transformer.*  (the OLMo LM)
    lm_head.weight                                   -> language_model.lm_head.weight       (untied head)
    model.mm_projector.0.* / model.mm_projector.2.*  -> multi_modal_projector.linear_1.* / linear_2.*
    model.vision_tower.vision_tower.vision_model.*   -> vision_tower.*  (CLIP ViT-L/14, transformers 5 names)

The exact names are not public outside the gated repository, so nothing is loaded silently: a tensor
that fits none of these families, or a tensor the model needs that the file lacks, is an error naming
them. LLaVA's config fields are read and checked (`mm_projector_type` mlp2x_gelu, `mm_vision_select_layer`,
`image_aspect_ratio` pad: this project's preprocessing pads to a square the same way, `mm_hidden_size`);
its image token (-200 in LLaVA's own code, never a vocabulary id) becomes `<image>` (50280, a spare row of
the padded embedding) and its `llava_v1` template is this project's `v1`.
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPVisionConfig

from model.backbones.olmo_bitnet import OLMoBitNetConfig
from model.checkpoint import load_state_dict_strict, read_config, read_state_dict, resolve_model_dir
from model.multimodal import BitLlavaConfig, BitLlavaForConditionalGeneration
from model.tokenizer import image_token_id, load_olmo_tokenizer
from model.towers import build_image_processor
from model.towers.clip import clip_vit_l14_config

RELEASE_SUBFOLDER = os.path.join("checkpoints", "llava-LlavaOLMoBitnet1B-Run3-finetune")
KEY_FAMILIES = (  # (prefix in the release, prefix here)
    ("model.transformer.", "language_model.model.transformer."),
    ("lm_head.", "language_model.lm_head."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    # transformers 5 keeps CLIPVisionModel's weights without the `vision_model.` level (it converts on load)
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
)
LLAVA_FIELDS = ("mm_vision_tower", "mm_projector_type", "mm_vision_select_layer", "mm_hidden_size")


def release_folder(path_or_hub_id: str) -> str:
    """The folder holding the release's config.json: the repository root or its checkpoints/ subfolder."""
    root = resolve_model_dir(path_or_hub_id)
    for folder in (os.path.join(root, RELEASE_SUBFOLDER), root):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise ValueError(f"{path_or_hub_id} holds no config.json (looked in {RELEASE_SUBFOLDER} and the folder itself)")


def vision_config(name: str) -> CLIPVisionConfig:
    """`mm_vision_tower`: the OpenAI CLIP ViT-L/14 id (its shapes are known) or a local CLIP folder."""
    if os.path.isdir(name):
        return CLIPVisionConfig.from_pretrained(name)
    if name.startswith("openai/clip-vit-large-patch14"):
        return clip_vit_l14_config(336 if name.endswith("-336") else 224)
    raise ValueError(f"mm_vision_tower {name!r} is neither openai/clip-vit-large-patch14(-336) nor a local CLIP folder")


def llava_config(raw: dict, folder: str) -> BitLlavaConfig:
    missing = [k for k in LLAVA_FIELDS if k not in raw]
    if missing:
        raise ValueError(f"{folder}/config.json is not a LLaVA config: missing {missing}")
    if raw["mm_projector_type"] != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {raw['mm_projector_type']!r} is unsupported (this model has mlp2x_gelu)")
    if raw.get("image_aspect_ratio", "pad") != "pad":
        raise ValueError(f"image_aspect_ratio {raw['image_aspect_ratio']!r} is unsupported: images are padded to a square")
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"mm_vision_select_feature {raw['mm_vision_select_feature']!r} is unsupported (patch tokens only)")
    vision = vision_config(raw["mm_vision_tower"])
    if raw["mm_hidden_size"] != vision.hidden_size:
        raise ValueError(f"mm_hidden_size {raw['mm_hidden_size']} differs from the tower's hidden size {vision.hidden_size}")
    text = OLMoBitNetConfig.from_olmo_config({**raw, "weight_tying": raw.get("weight_tying", False)})
    tokenizer = load_olmo_tokenizer()
    return BitLlavaConfig(text_config=text, vision_config=vision, image_token_id=image_token_id(tokenizer),
                          vision_feature_layer=raw["mm_vision_select_layer"], template="v1")


def map_state(state: dict[str, torch.Tensor], embedding_rows: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors under this project's names, names that fit no key family)."""
    mapped, unplaced = {}, []
    for key, tensor in state.items():
        target = next((here + key[len(there):] for there, here in KEY_FAMILIES if key.startswith(there)), None)
        if target is None:
            unplaced.append(key)
            continue
        if target == "language_model.lm_head.weight" and tensor.shape[0] < embedding_rows:
            # a head over the real vocabulary only: padding rows are never predicted (logits stop at vocab_size)
            tensor = torch.cat([tensor, tensor.new_zeros(embedding_rows - tensor.shape[0], tensor.shape[1])])
        mapped[target] = tensor
    return mapped, unplaced


def import_llava_olmo_bitnet(path_or_hub_id: str):
    """(model, tokenizer, image_processor) of the released LlavaOLMoBitnet1B, in float32, eval mode."""
    folder = release_folder(path_or_hub_id)
    raw = read_config(folder)
    config = llava_config(raw, folder)
    state = read_state_dict(folder)
    if config.text_config.weight_tying != ("lm_head.weight" not in state):
        config.text_config.weight_tying = "lm_head.weight" not in state  # the file decides: a head or none
    mapped, unplaced = map_state(state, config.text_config.embedding_size)
    if unplaced:
        shown = ", ".join(sorted(unplaced)[:8]) + (f", ... ({len(unplaced)} in all)" if len(unplaced) > 8 else "")
        raise ValueError(f"{folder}: tensors that fit no known LLaVA key family: {shown}; nothing was imported")
    model = BitLlavaForConditionalGeneration(config)
    load_state_dict_strict(model, {k: v.float() for k, v in mapped.items()}, folder)  # names what is missing
    tokenizer = load_olmo_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, build_image_processor(config.vision_config)
