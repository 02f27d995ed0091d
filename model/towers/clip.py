"""CLIP ViT (LLaVA-1.5's tower): OpenAI's CLIP ViT-L/14 shapes and its image processor."""

from __future__ import annotations

from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPImageProcessorPil", "CLIPVisionModel", "clip_image_processor",
           "clip_vit_l14_config", "image_processor_for"]


def clip_vit_l14_config(image_size: int = 336) -> CLIPVisionConfig:
    """openai/clip-vit-large-patch14(-336): 24 layers, hidden 1024, patch 14."""
    if image_size not in (224, 336):
        raise ValueError(f"CLIP ViT-L/14 exists at 224 or 336 px, not {image_size}")
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=image_size,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """The CLIP image processor at this size: shortest edge resized (bicubic), centre crop, CLIP mean and std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def image_processor_for(config: CLIPVisionConfig) -> CLIPImageProcessorPil:
    return clip_image_processor(config.image_size)
