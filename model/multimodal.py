"""BitLLaVA: a vision tower (CLIP or SigLIP) -> mlp2x_gelu projector -> a ternary LM (OLMo-Bitnet, BitNet, Llama, ...).

Source: Sundaram et al., "LLaVaOLMoBitNet1B: Ternary LLM goes Multimodal!" (2024), built on the
LLaVA-1.5 recipe. The merge follows transformers' LLaVA: each `<image>` placeholder is expanded
(by the conversation template) into one token per patch, and the projected patch features are
scattered over those positions of the token embeddings. The LM is any backbone of
`model.backbones`, chosen by `text_config.model_type`; the projector's output is its hidden size. A sample may hold several images; the
features of all images of a batch are concatenated in order of appearance.

Two entry points feed image information:
- `pixel_values` (N, 3, S, S): run the frozen tower, then the projector;
- `image_features` (N, patches, vision_hidden): cached tower outputs (the preprocessing step's
  `features` mode), skipping the tower.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from model.backbones import backbone, build_causal_lm, embedding_rows, predicted_vocab
from model.towers import build_tower, num_patches, select_patch_features


class BitLlavaConfig(PreTrainedConfig):
    """Composite config.

    text_config: the LM's config; its model_type picks the backbone (`model.backbones`; default olmo_bitnet).
    vision_config: the vision tower's config; its model_type picks the tower (`model.towers`: CLIP or SigLIP).
    image_token_id: id of the `<image>` placeholder: a spare row of OLMo's padded embedding (never
        predicted), or for other backbones a row added to the embedding (and head).
    vision_feature_layer: hidden layer of the tower whose patch tokens are used (-2 in LLaVA-1.5).
    projector_hidden_act: activation between the projector's two linears (`mlp2x_gelu`).
    multimodal_projector_bias: the projector's linears have biases (as in LLaVA).
    template: conversation template used for inference prompts (`v1` after instruction tuning).
    """

    model_type = "bitllava"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="olmo_bitnet"),
                            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model")}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 50280
    vision_feature_layer: int = -2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    template: str = "v1"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        rows = embedding_rows(self.text_config)
        if not 0 <= self.image_token_id < rows:
            raise ValueError(
                f"image_token_id {self.image_token_id} must index a row of the embedding ({rows} rows)"
            )
        spare_row = backbone(self.text_config.model_type).image_token == "spare row"
        if spare_row and self.image_token_id < predicted_vocab(self.text_config):
            raise ValueError(
                f"image_token_id {self.image_token_id} lies inside the predicted vocabulary "
                f"(vocab_size {self.text_config.vocab_size}); it must be an added token"
            )

    @property
    def num_image_tokens(self) -> int:
        return num_patches(self.vision_config)


class BitLlavaPreTrainedModel(PreTrainedModel):
    config_class = BitLlavaConfig
    config: BitLlavaConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["OLMoBitNetBlock", "LlamaDecoderLayer", "Qwen2DecoderLayer", "OlmoDecoderLayer",
                         "Olmo2DecoderLayer", "BitNetDecoderLayer", "CLIPEncoderLayer",
                         "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        # Sub-models (tower, LM) initialise themselves; this covers the projector.
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.zero_()


class BitLlavaForConditionalGeneration(BitLlavaPreTrainedModel, GenerationMixin):
    def __init__(self, config: BitLlavaConfig):
        super().__init__(config)
        self.vision_tower = build_tower(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)  # Linear -> GELU -> Linear
        self.language_model = build_causal_lm(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.set_input_embeddings(value)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, patches, vision_hidden): the tower's patch features (what `features` mode caches)."""
        return select_patch_features(self.vision_tower, pixel_values, self.config.vision_feature_layer)

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, patches, vision_hidden) -> (N, patches, LM hidden)."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        return self.multi_modal_projector(image_features.to(dtype))

    def merge_image_features(self, input_ids: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, d) with every `<image>` position replaced, in order, by a patch feature."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, T, d)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        n_positions = int(is_image.sum())
        n_images, n_patches = projected.shape[0], projected.shape[1]
        if n_positions != n_images * n_patches:
            raise ValueError(
                f"image placeholders do not match images: the batch has {n_positions} <image> positions "
                f"({n_positions / n_patches:g} images of {n_patches} patches) but {n_images} images were given"
            )
        mask = is_image.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, projected.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if inputs_embeds is None and input_ids is not None:
            if image_features is not None:
                inputs_embeds = self.merge_image_features(input_ids, self.project(image_features))
            elif bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("input_ids hold <image> placeholders but no pixel_values or image_features were given")
            elif self.training and torch.is_grad_enabled():
                # A text-only batch still takes the projector into the graph (with zero gradients), as LLaVA
                # does: data-parallel ranks must reduce the same parameters at every step, and a rank whose
                # batch has no image would otherwise skip the projector's gradients and desync the collectives.
                # It goes through the same calls, in the same order, as the image path, so gradients become
                # ready in the same order on every rank (ZeRO fills its reduce buckets in that order).
                empty = self.get_input_embeddings().weight.new_zeros(
                    0, self.config.num_image_tokens, self.config.vision_config.hidden_size)
                inputs_embeds = self.merge_image_features(input_ids, self.project(empty))
        return self.language_model(
            input_ids=None if inputs_embeds is not None else input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        # transformers drops pixel_values after prefill; cached features must be dropped the same way.
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("image_features", None)
        return inputs
