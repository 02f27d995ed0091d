"""A few in-process AdamW steps on one image-and-answer sample: the shared check that a model learns."""

from __future__ import annotations

from typing import Callable

import torch

from model.vision import preprocess_images


def answer_sample(loaded, image, answer: str = "a red square"):
    """(input_ids, labels, pixel_values): the image's positions, then `answer`, the only labelled tokens."""
    config = loaded.model.config
    answer_ids = loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[config.image_token_id] * config.num_image_tokens + answer_ids])
    labels = torch.full_like(ids, -100)
    labels[0, -len(answer_ids):] = ids[0, -len(answer_ids):]
    return ids, labels, preprocess_images([image], loaded.image_processor)


def train_a_few_steps(loaded, image, steps: int = 6, after_first_backward: Callable | None = None) -> list[float]:
    """The losses of `steps` AdamW steps (lr 3e-3, tower frozen); `after_first_backward(model)` checks gradients."""
    model = loaded.model.train()
    ids, labels, pixels = answer_sample(loaded, image)
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        if not losses and after_first_backward is not None:
            after_first_backward(model)
        optimizer.step()
        losses.append(loss.item())
    return losses
