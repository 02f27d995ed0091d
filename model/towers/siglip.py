"""SigLIP (TinyLLaVA's tower, e.g. google/siglip-so400m-patch14-384) and its image processor."""

from __future__ import annotations

from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.image_utils import PILImageResampling
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

__all__ = ["SiglipImageProcessorPil", "SiglipVisionModel", "image_processor_for", "siglip_so400m_config"]


def siglip_so400m_config(image_size: int = 384) -> SiglipVisionConfig:
    """google/siglip-so400m-patch14-384's vision half: 27 layers, hidden 1152, patch 14 (729 patches), no pooling
    head (unused: LLaVA-style models read a hidden layer's patch features)."""
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              patch_size=14, image_size=image_size, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6, vision_use_head=False)


def image_processor_for(config: SiglipVisionConfig) -> SiglipImageProcessorPil:
    """SigLIP's processor as published: the whole image resized to the square (bicubic, no crop), values
    rescaled to [0, 1] then normalised with mean and std 0.5."""
    side = config.image_size
    return SiglipImageProcessorPil(size={"height": side, "width": side}, resample=PILImageResampling.BICUBIC,
                                   image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
