"""Batched greedy answers to image prompts (each task builds its prompts: `components.evaluate.prompts`).

Source: LLaVA-1.5's evaluation (`llava/eval/model_vqa_loader.py` and the question files of
`scripts/v1_5/eval/*.sh`): one image before the prompt, greedy decoding; the short-answer prompt is
the question followed by "\\nAnswer the question using a single word or phrase.".

A batch is built from the same pieces as `model.chat.generate_reply`: `prompt_ids` renders the
conversation template (with one `<image>` expanded to its patch positions), the prompts are
left-padded to a common length, and `generate` decodes them together. Greedy answers equal those of
`generate_reply` one at a time.
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from model.chat import user_turn
from model.checkpoint import LoadedModel, is_hub_id
from model.conversation import prompt_ids
from model.loading import is_packed_folder, load_any_model  # noqa: F401  (is_packed_folder: re-exported)
from model.precision import resolve_dtypes, set_vision_dtype
from model.vision import preprocess_images

from components.evaluate.prompts import SHORT_ANSWER_SUFFIX, short_answer_prompt  # noqa: F401  (re-exported)


def model_location(path: str) -> str:
    """A model folder as an absolute path (checked for a config.json), or a hub id left to the loader."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path} is not a model folder: no config.json")
        return os.path.abspath(path)
    if not is_hub_id(path):
        raise ValueError(f"{path!r} is not a model folder (and not an 'owner/name' hub id)")
    return path


def load_eval_model(path: str, dtype: str = "float32") -> LoadedModel:
    """A checkpoint folder (or hub id) or a packed model folder, in eval mode; it must take images.

    Both load through `model.loading.load_any_model`, so a packed folder answers as the checkpoint it
    was packed from. dtype: "float32", "bfloat16", or "auto" (`model.precision.resolve_dtypes`: bf16 on a
    GPU or a CPU with native bf16, else float32).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    llm_dtype, vision_dtype = resolve_dtypes(dtype, device)
    loaded = load_any_model(path, dtype=llm_dtype)
    if not loaded.multimodal:
        raise ValueError(f"{path} holds a text-only LLM ({loaded.layout}); evaluation needs a multimodal model")
    set_vision_dtype(loaded.model, vision_dtype)
    return loaded


def batch_prompt_ids(loaded: LoadedModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts with one image each -> left-padded input_ids and attention_mask, (B, T)."""
    config, tokenizer = loaded.model.config, loaded.tokenizer
    rows = [prompt_ids([user_turn(p, 1)], tokenizer, config.template, 1, config.num_image_tokens) for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def answer_batch(loaded: LoadedModel, questions: list[str], images: list[Image.Image],
                 max_new_tokens: int = 16) -> list[str]:
    """Greedy short answers, one per (question, image)."""
    return answer_prompts(loaded, [short_answer_prompt(q) for q in questions], images, max_new_tokens)


@torch.no_grad()
def answer_prompts(loaded: LoadedModel, prompts: list[str], images: list[Image.Image],
                   max_new_tokens: int = 16) -> list[str]:
    """Greedy replies, one per (prompt, image), the image placed before the prompt."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if not prompts:
        return []
    model, tokenizer = loaded.model, loaded.tokenizer
    input_ids, attention_mask = batch_prompt_ids(loaded, prompts)
    pixel_values = preprocess_images(images, loaded.image_processor)
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        pixel_values=pixel_values.to(model.device),  # the tower casts to its own dtype
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    answers = []
    for row in out[:, input_ids.shape[1]:].tolist():  # (B, new tokens)
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
