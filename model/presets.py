"""Model presets: `1b` (LLaVaOLMoBitNet1B's shapes), `tiny` (the same code, CPU-sized) and
`bitnet-2b-4t` (CLIP ViT-L/14-336 on microsoft/bitnet-b1.58-2B-4T's shapes).

A preset is a recipe for a `BitLlavaConfig` plus its tokenizer and image processor. Weights are
random: real weights come from checkpoints (`model.checkpoint`). A preset whose tokenizer is not
shipped (`bitnet-2b-4t`: LLaMA 3's) describes shapes only; its model is built from the LLM's own
folder (`bitllava model init --llm microsoft/bitnet-b1.58-2B-4T-bf16`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import CLIPVisionConfig, PreTrainedConfig, PreTrainedTokenizerFast

from model.backbones import embedding_rows, hidden_size, text_config_from_dict
from model.bitlinear import BitLinear158
from model.multimodal import BitLlavaConfig, BitLlavaForConditionalGeneration
from model.backbones.olmo_bitnet import OLMoBitNetConfig
from model.tokenizer import build_tiny_tokenizer, image_token_id, load_olmo_tokenizer
from model.towers import build_image_processor
from model.towers.clip import clip_vit_l14_config


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    tokenizer: Callable[[], PreTrainedTokenizerFast] | None  # None: the LLM folder's own
    vision: Callable[[], CLIPVisionConfig]
    llm: dict  # olmo_bitnet: OLMoBitNetConfig fields other than vocab sizes and special tokens;
    #            other backbones: the published config.json's fields (model_type included)
    max_length: int  # default training sequence length
    backbone: str = "olmo_bitnet"
    source: str = ""  # where `llm`'s numbers come from


def _tiny_vision() -> CLIPVisionConfig:
    # 64 px images, 16 px patches -> 16 patch tokens
    return CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        patch_size=16, image_size=64, projection_dim=64, hidden_act="quick_gelu",
    )


PRESETS: dict[str, Preset] = {
    "1b": Preset(
        name="1b",
        description="LLaVaOLMoBitNet1B: CLIP ViT-L/14-336 + mlp2x_gelu + OLMo-Bitnet-1B (d 2048, 16 layers)",
        tokenizer=load_olmo_tokenizer,
        vision=lambda: clip_vit_l14_config(336),
        llm=dict(d_model=2048, n_heads=16, n_layers=16, mlp_ratio=8, max_sequence_length=2048),
        max_length=2048,
    ),
    "tiny": Preset(
        name="tiny",
        description="CPU test/demo model: 2-layer ViT (64 px, 16 patches) + 2-layer BitLinear LM (d 128)",
        tokenizer=build_tiny_tokenizer,
        vision=_tiny_vision,
        llm=dict(d_model=128, n_heads=4, n_layers=2, mlp_ratio=8, max_sequence_length=512),
        max_length=256,
    ),
    "bitnet-2b-4t": Preset(
        name="bitnet-2b-4t",
        description="CLIP ViT-L/14-336 + mlp2x_gelu + BitNet b1.58 2B-4T (d 2560, 30 layers, GQA 20/5, SubLN)",
        tokenizer=None,
        vision=lambda: clip_vit_l14_config(336),
        llm=dict(model_type="bitnet", vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                 num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5, hidden_act="relu2",
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                 bos_token_id=128000, eos_token_id=128001),
        max_length=2048,
        backbone="bitnet",
        source="microsoft/bitnet-b1.58-2B-4T(-bf16) config.json",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, qk_norm: bool = False, vision_config: PreTrainedConfig | None = None,
                  ) -> tuple[BitLlavaConfig, PreTrainedTokenizerFast | None]:
    """The preset's config, with vocabulary sizes and special tokens taken from its tokenizer; `qk_norm` turns
    on the OLMo-Bitnet LM's per-head QK-norm (Chameleon's); `vision_config` replaces the preset's tower (a CLIP
    or SigLIP config, `model.towers`).

    A preset without a shipped tokenizer gets `<image>` as one added row after its vocabulary (what
    `model init --llm` does with the LLM's own tokenizer) and None for the tokenizer."""
    preset = get_preset(name)
    vision = vision_config if vision_config is not None else preset.vision()
    if preset.tokenizer is None:
        if qk_norm:  # model.assemble.check_qk_norm says so where the choice enters
            raise ValueError(f"qk_norm is an option of the OLMo-Bitnet presets (tiny, 1b), not of {name}")
        text = text_config_from_dict({**preset.llm, "vocab_size": preset.llm["vocab_size"] + 1})
        config = BitLlavaConfig(text_config=text, vision_config=vision, image_token_id=preset.llm["vocab_size"])
        config.eos_token_id = text.eos_token_id
        return config, None
    tokenizer = preset.tokenizer()
    image_id = image_token_id(tokenizer)
    base_vocab = image_id  # every id below <image> is a real, predictable token
    text = OLMoBitNetConfig(
        **preset.llm,
        vocab_size=base_vocab,
        embedding_size=_round_up(len(tokenizer), 64),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        qk_norm=qk_norm,
    )
    config = BitLlavaConfig(text_config=text, vision_config=vision, image_token_id=image_id)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config, tokenizer


def build_from_preset(name: str, seed: int = 0, qk_norm: bool = False, vision_config: PreTrainedConfig | None = None):
    """Random-weight model, tokenizer and image processor of a preset (with another tower: `preset_config`)."""
    config, tokenizer = preset_config(name, qk_norm, vision_config)
    if tokenizer is None:
        raise ValueError(f"the {name} preset has no shipped tokenizer: build it on its LLM's folder "
                         f"(bitllava model init --preset {name} --llm FOLDER_OR_HUB_ID)")
    torch.manual_seed(seed)
    model = BitLlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = build_image_processor(config.vision_config)
    return model, tokenizer, processor


def count_parameters(model: BitLlavaForConditionalGeneration) -> dict:
    """Parameter counts of each part; `bitlinear_weights` are the ternary ones."""
    def total(module):
        return sum(p.numel() for p in module.parameters())

    bitlinear = sum(m.weight.numel() for m in model.language_model.modules() if isinstance(m, BitLinear158))
    counts = {
        "llm_params": total(model.language_model),
        "bitlinear_weights": bitlinear,
        "vision_params": total(model.vision_tower),
        "projector_params": total(model.multi_modal_projector),
    }
    counts["total_params"] = counts["llm_params"] + counts["vision_params"] + counts["projector_params"]
    return counts


def describe(name: str) -> dict:
    """Counts and shapes of a preset, built on the meta device (no memory, no init time)."""
    config, _ = preset_config(name)
    preset = get_preset(name)
    with torch.device("meta"):
        model = BitLlavaForConditionalGeneration(config)
    text, vision = config.text_config, config.vision_config
    info = {"preset": name, "description": preset.description, "backbone": text.model_type,
            **count_parameters(model)}
    lm = {k: getattr(text, k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size") if hasattr(text, k)}
    info.update(
        d_model=hidden_size(text), n_layers=text.num_hidden_layers, n_heads=text.num_attention_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
        mlp_hidden_size=getattr(text, "mlp_hidden_size", None) or lm.get("intermediate_size"),
        vocab_size=text.vocab_size, embedding_size=embedding_rows(text), image_token_id=config.image_token_id,
        image_size=vision.image_size, patch_size=vision.patch_size, image_tokens=config.num_image_tokens,
        vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
        bitlinear_bf16_bytes=2 * info["bitlinear_weights"], bitlinear_2bit_bytes=info["bitlinear_weights"] // 4,
    )
    if preset.tokenizer is None:  # the LLM as published: without the added <image> row
        tied = getattr(text, "tie_word_embeddings", False)
        info["llm_params_published"] = info["llm_params"] - hidden_size(text) * (1 if tied else 2)
        info["llm_source"] = preset.source
    return info
