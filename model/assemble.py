"""Build the starting model of a training run: a preset's shapes, random or pretrained parts.

LLaVaOLMoBitNet1B starts from pretrained CLIP ViT-L/14-336 and OLMo-Bitnet-1B with a fresh
projector; the `tiny` preset starts from random weights. `--llm` may also name a transformers LLM
of another backbone (`model.backbones`: BitNet 2B-4T, Llama, Qwen2, OLMo, OLMo-2): the model is then
composed on it, with its own tokenizer, the projector sized to its hidden size and `<image>` a row
added to its embedding (and untied head), initialised to the mean row. Either way the result is
saved once as a model folder that preprocessing (tokenizer, image processor, frozen tower for cached
features) and training both read, so every step sees the same tower and tokenizer.
"""

from __future__ import annotations

import torch
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from model.backbones import backbone, embedding_rows
from model.checkpoint import load_model, load_state_dict_strict
from model.multimodal import BitLlavaConfig, BitLlavaForConditionalGeneration
from model.presets import build_from_preset, get_preset
from model.tokenizer import image_token_id
from model.towers import build_image_processor, build_tower, load_pretrained_tower, pretrained_vision_config


def init_model(preset: str, seed: int = 0, vision: str | None = None, llm: str | None = None, qk_norm: bool = False):
    """(model, tokenizer, image_processor): the preset, with the tower and/or LLM from pretrained folders or hub ids;
    `vision`: a CLIP or SigLIP tower (its kind, shapes and processor from its own config, `model.towers`);
    `qk_norm`: a fresh OLMo-Bitnet LM with Chameleon's QK-norm (see `check_qk_norm`)."""
    check_qk_norm(qk_norm, preset, llm)
    vision_config = pretrained_vision_config(vision) if vision is not None else None
    if llm is not None:
        loaded = load_model(llm)
        if loaded.multimodal:
            raise ValueError(f"{llm} is a multimodal model; --llm takes a language model")
        if loaded.layout not in ("olmo_bitnet", "olmo_published"):
            model, tokenizer, processor = compose_on_llm(preset, loaded.model, loaded.tokenizer, seed, vision_config)
            if vision is not None:
                load_tower(model, vision)
            return model, tokenizer, processor
    model, tokenizer, processor = build_from_preset(preset, seed=seed, qk_norm=qk_norm, vision_config=vision_config)
    if vision is not None:
        load_tower(model, vision)
    if llm is not None:
        if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{llm}'s tokenizer differs from the {preset} preset's")
        load_state_dict_strict(model.language_model, loaded.model.state_dict(), llm)
    return model, tokenizer, processor


def check_qk_norm(qk_norm: bool, preset: str, llm: str | None) -> None:
    """QK-norm is for a fresh OLMo-Bitnet LM: on a pretrained one it adds norms the LM was not trained with."""
    if not qk_norm:
        return
    if llm is not None:
        raise ValueError("qk_norm adds norms a pretrained LM was not trained with: it is for a fresh LM (no --llm)")
    if get_preset(preset).tokenizer is None:
        raise ValueError(f"qk_norm is an option of the OLMo-Bitnet presets (tiny, 1b), not of {preset}")


def load_tower(model: BitLlavaForConditionalGeneration, vision: str) -> None:
    tower = load_pretrained_tower(vision)
    load_state_dict_strict(model.vision_tower, tower.state_dict(), vision)


@torch.no_grad()
def add_image_row(lm, tokenizer) -> int:
    """`<image>`'s id; where it lies past the embedding, the embedding (and an untied head) grow to hold it,
    the new rows set to the mean of the old ones (a neutral start: the row is never a training target)."""
    image_id = image_token_id(tokenizer)
    rows = embedding_rows(lm.config)
    if image_id < rows:
        return image_id  # a spare row of a padded embedding (Qwen2 pads to a multiple of 128)
    embed = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    mean_embed = embed.weight.mean(0)
    mean_head = None if head is None or tied else head.weight.mean(0)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lm.get_input_embeddings().weight[rows:] = mean_embed
    if mean_head is not None:
        lm.get_output_embeddings().weight[rows:] = mean_head
    return image_id


@torch.no_grad()
def compose_on_llm(preset: str, lm, tokenizer, seed: int = 0, vision_config=None):
    """A multimodal model of `preset`'s vision tower (or of `vision_config`'s) on a loaded backbone LM (its weights
    kept)."""
    spec = backbone(lm.config.model_type)
    if spec.image_token != "added row":
        raise ValueError(f"{spec.family} LMs are composed through the {preset} preset's own config")
    image_id = add_image_row(lm, tokenizer)
    vision = vision_config if vision_config is not None else get_preset(preset).vision()
    config = BitLlavaConfig(text_config=lm.config, vision_config=vision, image_token_id=image_id)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device("meta"):  # the LM exists already: build the frame without a second random copy
        model = BitLlavaForConditionalGeneration(config)
    model.language_model = lm
    model.vision_tower = build_tower(config.vision_config)
    model.multi_modal_projector = LlavaMultiModalProjector(config)
    for linear in (model.multi_modal_projector.linear_1, model.multi_modal_projector.linear_2):
        linear.weight.normal_(mean=0.0, std=0.02)
        linear.bias.zero_()
    model.to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, build_image_processor(config.vision_config)
