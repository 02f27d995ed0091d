"""One-shot generation: a prompt and optional images in, the model's reply out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from model.checkpoint import LoadedModel
from model.conversation import prompt_ids
from model.tokenizer import IMAGE_TOKEN
from model.vision import preprocess_images


@dataclass
class Reply:
    text: str
    token_ids: list[int]  # generated ids only (the prompt excluded)


def user_turn(prompt: str, num_images: int) -> dict:
    """A human turn holding `num_images` placeholders: those written in the prompt, else prepended."""
    present = prompt.count(IMAGE_TOKEN)
    if present not in (0, num_images):
        raise ValueError(f"the prompt holds {present} {IMAGE_TOKEN} placeholders but {num_images} images were given")
    value = prompt if present else IMAGE_TOKEN * num_images + ("\n" if num_images else "") + prompt
    return {"from": "human", "value": value}


@torch.no_grad()
def generate_reply(
    loaded: LoadedModel,
    prompt: str,
    images: list[Image.Image] | None = None,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Reply:
    images = images or []
    model, tokenizer = loaded.model, loaded.tokenizer
    if images and not loaded.multimodal:
        raise ValueError("this is a text-only LLM folder; it cannot take images")
    if loaded.multimodal:
        template, n_tokens = model.config.template, model.config.num_image_tokens
        ids = prompt_ids([user_turn(prompt, len(images))], tokenizer, template, len(images), n_tokens)
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty")
    input_ids = torch.tensor([ids], device=model.device)
    kwargs = {}
    if images:
        pixels = preprocess_images(images, loaded.image_processor)
        kwargs["pixel_values"] = pixels.to(model.device, model.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    new_ids = out[0, input_ids.shape[1]:].tolist()
    return Reply(text=tokenizer.decode(new_ids, skip_special_tokens=True).strip(), token_ids=new_ids)
