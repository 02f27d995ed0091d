"""Image preparation (LLaVA-1.5): images padded to a square, then the tower's own processor.

Source: Liu et al., "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5, 2023) and the
LLaVA repository: images are first padded to a square with the processor's mean colour ("pad"
aspect mode), then run through the tower's image processor (`model.towers`: CLIP's resizes the
short side and centre-crops, SigLIP's resizes the whole square), which normalises them.
"""

from __future__ import annotations

import torch
from PIL import Image


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically with `background`, keeping the image centred (LLaVA's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(processor) -> tuple[int, int, int]:
    return tuple(int(255 * m) for m in processor.image_mean)


def preprocess_images(images: list[Image.Image], processor) -> torch.Tensor:
    """PIL images of any size and mode -> pixel_values (N, 3, S, S) float32."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    background = mean_colour(processor)
    squared = [expand_to_square(img.convert("RGB"), background) for img in images]
    return processor(images=squared, return_tensors="pt")["pixel_values"]
