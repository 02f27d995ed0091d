"""Vision towers, chosen by the vision config's `model_type` (as `model.backbones` chooses the LM).

- clip_vision_model (`clip.py`): CLIP ViT, LLaVA-1.5's tower: patch features of a hidden layer
  without the CLS token; the CLIP processor (shortest edge resized, centre crop, CLIP mean and std).
- siglip_vision_model (`siglip.py`): SigLIP, TinyLLaVA's best tower: no CLS token (729 patches at
  384 px with patch 14); its processor resizes to the square without a crop, mean and std 0.5.

A tower's patch count, processor and features follow from its config alone, so a model folder's
config says everything preprocessing, training, packing and serving need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from model.towers import clip, siglip


@dataclass(frozen=True)
class Tower:
    model_type: str
    family: str
    model_class: type
    processor_class: type
    build_processor: Callable  # vision config -> image processor
    cls_token: bool  # the tower's sequence starts with a CLS token that is not a patch


TOWERS = {
    "clip_vision_model": Tower("clip_vision_model", "CLIP", clip.CLIPVisionModel, clip.CLIPImageProcessorPil,
                               clip.image_processor_for, cls_token=True),
    "siglip_vision_model": Tower("siglip_vision_model", "SigLIP", siglip.SiglipVisionModel,
                                 siglip.SiglipImageProcessorPil, siglip.image_processor_for, cls_token=False),
}
# full two-tower checkpoints (CLIPModel, SiglipModel) whose vision half is the tower
FULL_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def tower_spec(vision_config: PreTrainedConfig) -> Tower:
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in TOWERS:
        raise ValueError(f"vision tower model_type {model_type!r} is not supported; "
                         f"supported: {sorted(TOWERS)} (CLIP and SigLIP save_pretrained folders)")
    return TOWERS[model_type]


def build_tower(vision_config: PreTrainedConfig) -> nn.Module:
    return tower_spec(vision_config).model_class(vision_config)


def num_patches(vision_config: PreTrainedConfig) -> int:
    """Patch features per image: 576 for CLIP ViT-L/14 at 336 px (CLS excluded), 729 for SigLIP at 384 px."""
    tower_spec(vision_config)
    return (vision_config.image_size // vision_config.patch_size) ** 2


def feature_depth(num_layers: int, feature_layer: int) -> int:
    """How many tower layers reach the patch features: hidden_states[i] is the output of layer i - 1 (index 0
    the embeddings), so feature layer -2 of 24 layers reads layer 22's output and layer 23 is unused."""
    return feature_layer % (num_layers + 1)


def select_patch_features(tower: nn.Module, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """(N, 3, H, W) -> (N, patches, hidden): hidden_states[layer], without the CLS token where the tower has one."""
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
    features = out.hidden_states[layer]
    return features[:, 1:] if tower_spec(tower.config).cls_token else features


def build_image_processor(vision_config: PreTrainedConfig):
    """The tower's own image processor at its image size (PIL backend: no torchvision needed)."""
    return tower_spec(vision_config).build_processor(vision_config)


def load_image_processor(folder: str, vision_config: PreTrainedConfig):
    """The image processor a model folder saved, read with its tower's processor class."""
    return tower_spec(vision_config).processor_class.from_pretrained(folder)


def pretrained_vision_config(name: str) -> PreTrainedConfig:
    """The vision config of a tower folder or hub id: a vision model's own config, or the vision half of a
    full CLIP / SigLIP checkpoint."""
    config = AutoConfig.from_pretrained(name)
    if config.model_type in FULL_MODEL_TYPES:
        config = config.vision_config
    tower_spec(config)
    if config.model_type == "siglip_vision_model":
        # LLaVA-style models read a hidden layer's patch features, never SigLIP's pooled output: no head
        config.vision_use_head = False
    return config


def load_pretrained_tower(name: str) -> nn.Module:
    """A CLIP or SigLIP tower from a `save_pretrained` folder or hub id (its config: `pretrained_vision_config`),
    in float32."""
    config = pretrained_vision_config(name)
    return tower_spec(config).model_class.from_pretrained(name, config=config, dtype=torch.float32)


def processor_identity(processor) -> dict:
    """What a preprocessed store's pixels depend on in the processor (the store fingerprint's part)."""
    keys = ("size", "crop_size", "image_mean", "image_std")
    identity = {k: dict(v) if hasattr(v, "keys") else list(v)
                for k, v in ((k, getattr(processor, k, None)) for k in keys) if v is not None}
    if not isinstance(processor, clip.CLIPImageProcessorPil):  # CLIP stores keep their earlier fingerprint
        identity["processor"] = type(processor).__name__
        identity["do_center_crop"] = bool(getattr(processor, "do_center_crop", False))
    return identity
