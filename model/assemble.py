"""Build the starting model of a training run: a preset's shapes, random or pretrained parts.

LLaVaOLMoBitNet1B starts from pretrained CLIP ViT-L/14-336 and OLMo-Bitnet-1B with a fresh
projector; the `tiny` preset starts from random weights. Either way the result is saved once as a
model folder that preprocessing (tokenizer, image processor, frozen tower for cached features)
and training both read, so every step sees the same tower and tokenizer.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionModel

from model.checkpoint import load_model, load_state_dict_strict
from model.presets import build_from_preset


def init_model(preset: str, seed: int = 0, vision: str | None = None, llm: str | None = None):
    """(model, tokenizer, image_processor): the preset, with the tower and/or LLM from pretrained folders or hub ids."""
    model, tokenizer, processor = build_from_preset(preset, seed=seed)
    if vision is not None:
        tower = CLIPVisionModel.from_pretrained(vision, dtype=torch.float32)
        load_state_dict_strict(model.vision_tower, tower.state_dict(), vision)
    if llm is not None:
        loaded = load_model(llm)
        if loaded.multimodal:
            raise ValueError(f"{llm} is a multimodal model; --llm takes an OLMo-Bitnet LM")
        if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{llm}'s tokenizer differs from the {preset} preset's")
        load_state_dict_strict(model.language_model, loaded.model.state_dict(), llm)
    return model, tokenizer, processor
