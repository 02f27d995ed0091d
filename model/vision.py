"""Vision tower and image preprocessing (LLaVA-1.5).

Source: Liu et al., "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5, 2023) and the
LLaVA repository: a CLIP ViT (transformers' `CLIPVisionModel`) whose second-to-last hidden layer,
CLS token dropped, gives one feature per patch; images are first padded to a square with the CLIP
mean colour ("pad" aspect mode), then run through the CLIP image processor (bicubic resize of the
short side, center crop, normalise).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def num_patches(config: CLIPVisionConfig) -> int:
    """Patch tokens per image: 576 at 336 px, 256 at 224 px (CLS excluded)."""
    return (config.image_size // config.patch_size) ** 2


def select_patch_features(tower: CLIPVisionModel, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """(N, 3, H, W) -> (N, patches, hidden): hidden_states[layer] without the CLS token."""
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """The CLIP image processor at this size (PIL backend: no torchvision needed)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically with `background`, keeping the image centred (LLaVA's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(processor: CLIPImageProcessorPil) -> tuple[int, int, int]:
    return tuple(int(255 * m) for m in processor.image_mean)


def preprocess_images(images: list[Image.Image], processor: CLIPImageProcessorPil) -> torch.Tensor:
    """PIL images of any size and mode -> pixel_values (N, 3, S, S) float32."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    background = mean_colour(processor)
    squared = [expand_to_square(img.convert("RGB"), background) for img in images]
    return processor(images=squared, return_tensors="pt")["pixel_values"]
