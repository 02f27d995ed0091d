"""OLMo-Bitnet: OLMo's decoder with every block linear a BitLinear158.

Sources: Groeneveld et al., "OLMo: Accelerating the Science of Language Models" (2024), OLMo's
`olmo/model.py`, and NousResearch/OLMo-Bitnet-1B (its config.json and checkpoint layout).

Shapes (1b): d_model 2048, 16 layers, 16 heads of 128, no biases, SwiGLU MLP 2048 -> 16384 ->
(chunk) 8192 -> 2048, RoPE (rotate-half layout, theta 10000), RMSNorm with affine weight (eps 1e-5,
fp32) before attention, before the MLP and at the end, tied input/output embedding padded to 50304
rows. Parameter names reproduce the published checkpoint keys exactly:

    model.transformer.wte.weight
    model.transformer.blocks.{i}.{att_proj,attn_out,ff_proj,ff_out,attn_norm,ff_norm}.weight
    model.transformer.ln_f.weight

Config field names are OLMo's own, so a published config.json loads as is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from model.bitlinear import BitLinear158


class OLMoBitNetConfig(PreTrainedConfig):
    """Configuration of the OLMo-Bitnet LM, with OLMo's field names (see its config.json).

    d_model: hidden width.
    n_heads: attention heads (head_dim = d_model // n_heads).
    n_layers: transformer blocks.
    mlp_ratio: ff_proj output = mlp_ratio * d_model when mlp_hidden_size is None.
    mlp_hidden_size: explicit ff_proj output width (the SwiGLU input is half of it).
    vocab_size: tokens the LM can emit; logits have this many columns.
    embedding_size: rows of the embedding (>= vocab_size, padded; spare rows hold added tokens).
    max_sequence_length: longest sequence RoPE is used for.
    rope_theta: RoPE base.
    layer_norm_eps: eps of every RMSNorm, the BitLinear inner one included.
    weight_tying: the output head is the input embedding (OLMo-Bitnet-1B); false adds an untied `lm_head`
        of embedding_size rows (the paper's released LLaVA checkpoint has one).
    init_std: std of the normal initialisation of fresh weights.
    qk_norm: Chameleon's QK-norm: an affine RMSNorm over each head's queries and keys (`q_norm`, `k_norm`,
        head_dim wide, shared by the heads), before RoPE, bounding the attention logits' growth. Not in the
        published OLMo-Bitnet-1B (false); it changes a pretrained model's function, so it belongs to models
        trained (or ternarized) with it.
    """

    model_type = "olmo_bitnet"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_sequence_length",
    }

    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 16
    mlp_ratio: int = 8
    mlp_hidden_size: int | None = None
    vocab_size: int = 50280
    embedding_size: int | None = 50304
    max_sequence_length: int = 2048
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    weight_tying: bool = True
    init_std: float = 0.02
    qk_norm: bool = False
    eos_token_id: int | None = 50279
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False  # the head reads `wte` directly; there is no separate weight to tie

    def __post_init__(self, **kwargs):
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        super().__post_init__(**kwargs)
        self.validate_shapes()

    def validate_shapes(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim ({self.d_model // self.n_heads}) must be even for RoPE")
        if self.mlp_hidden_size % 2:
            raise ValueError(f"mlp_hidden_size ({self.mlp_hidden_size}) must be even for SwiGLU")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size ({self.embedding_size}) < vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.n_heads

    # OLMo config.json fields this model understands; the rest (flash_attention, init_fn, ...)
    # are training-time settings of OLMo's own trainer.
    OLMO_FIELDS = (
        "d_model", "n_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "vocab_size", "embedding_size",
        "max_sequence_length", "rope_theta", "layer_norm_eps", "weight_tying", "init_std",
        "eos_token_id", "pad_token_id",
    )
    # Published architecture switches that this implementation hard-wires; any other value is refused.
    OLMO_REQUIRED = {
        "activation_type": "swiglu", "block_type": "sequential", "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "include_bias": False, "bias_for_layer_norm": False, "rope": True,
        "alibi": False, "multi_query_attention": False, "attention_layer_norm": False, "clip_qkv": None,
        "scale_logits": False, "ternary": True,
    }

    @classmethod
    def from_olmo_config(cls, raw: dict) -> "OLMoBitNetConfig":
        """Build from a published OLMo(-Bitnet) config.json dict, refusing architectures it cannot run."""
        missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"not an OLMo config.json: missing {missing}")
        for key, want in cls.OLMO_REQUIRED.items():
            if key in raw and raw[key] != want:
                raise ValueError(f"unsupported OLMo architecture: {key}={raw[key]!r} (this model needs {want!r})")
        if raw.get("n_kv_heads") not in (None, raw["n_heads"]):
            raise ValueError(f"unsupported OLMo architecture: n_kv_heads={raw['n_kv_heads']} (GQA)")
        return cls(**{k: raw[k] for k in cls.OLMO_FIELDS if k in raw and raw[k] is not None})


class RMSNorm(nn.Module):
    """OLMo's RMSLayerNorm with an affine weight, computed in fp32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin tables in fp32 (OLMo's rope_full_precision), rotate-half layout."""

    def __init__(self, config: OLMoBitNetConfig):
        super().__init__()
        self.dim = config.head_dim
        self.theta = config.rope_theta

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Frequencies are recomputed per call (head_dim/2 values) rather than kept in a buffer, so
        # meta-device construction and from_pretrained never leave them uninitialised.
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device) / self.dim
        inv_freq = 1.0 / (self.theta**exponent)  # (head_dim/2,)
        # position_ids: (B, T) -> cos, sin: (B, T, head_dim)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class OLMoBitNetBlock(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(attn_norm(x)), then x + mlp(ff_norm(x))."""

    def __init__(self, config: OLMoBitNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1  # read by transformers' attention functions
        self.is_causal = True
        d, eps = config.d_model, config.layer_norm_eps
        self.att_proj = BitLinear158(d, 3 * d, eps)  # fused q, k, v
        self.attn_out = BitLinear158(d, d, eps)
        self.ff_proj = BitLinear158(d, config.mlp_hidden_size, eps)
        self.ff_out = BitLinear158(config.mlp_hidden_size // 2, d, eps)
        self.attn_norm = RMSNorm(d, eps)
        self.ff_norm = RMSNorm(d, eps)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps)
            self.k_norm = RMSNorm(self.head_dim, eps)

    def attention(self, h, position_embeddings, attention_mask, cache, **kwargs):
        B, T, _ = h.shape
        q, k, v = self.att_proj(h).split(self.config.d_model, dim=-1)  # 3 x (B, T, d)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, T_past + T, hd)
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        y, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.attn_out(y.reshape(B, T, -1).contiguous())  # (B, T, d)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        x, gate = self.ff_proj(h).chunk(2, dim=-1)  # 2 x (B, T, hidden/2); the gate is the second half
        return self.ff_out(F.silu(gate) * x)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        x = hidden_states
        x = x + self.attention(self.attn_norm(x), position_embeddings, attention_mask, cache, **kwargs)
        return x + self.mlp(self.ff_norm(x))


class OLMoBitNetPreTrainedModel(PreTrainedModel):
    config_class = OLMoBitNetConfig
    config: OLMoBitNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OLMoBitNetBlock"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.init_std if hasattr(self.config, "init_std") else 0.02
        if isinstance(module, (BitLinear158, nn.Linear)):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class OLMoBitNetModel(OLMoBitNetPreTrainedModel):
    """The decoder stack: embeddings -> blocks -> ln_f (no head)."""

    def __init__(self, config: OLMoBitNetConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList([OLMoBitNetBlock(config, i) for i in range(config.n_layers)]),
                ln_f=RMSNorm(config.d_model, config.layer_norm_eps),
            )
        )
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.transformer.wte(input_ids)  # (B, T, d)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)

        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        h = inputs_embeds
        for block in self.transformer.blocks:
            h = block(
                h,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache if use_cache else None,
                **kwargs,
            )
        h = self.transformer.ln_f(h)
        return BaseModelOutputWithPast(last_hidden_state=h, cache=cache if use_cache else None)


class OLMoBitNetForCausalLM(OLMoBitNetPreTrainedModel, GenerationMixin):
    """LM with the tied head: logits = h @ wte[:vocab_size].T (padding rows are never predicted), or with
    an untied `lm_head` (weight_tying false): logits = h @ lm_head[:vocab_size].T."""

    def __init__(self, config: OLMoBitNetConfig):
        super().__init__(config)
        self.model = OLMoBitNetModel(config)
        if not config.weight_tying:
            self.lm_head = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def head_weight(self) -> torch.Tensor:
        head = self.model.transformer.wte if self.config.weight_tying else self.lm_head
        return head.weight[: self.config.vocab_size]  # (V, d)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, V) through the tied head (the packed model swaps in other heads here)."""
        return F.linear(h, self.head_weight())

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.logits(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
