"""The LM against an independent plain-PyTorch forward of the same weights (OLMo's own maths)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM


def _reference_forward(state: dict, cfg: OLMoBitNetConfig, ids: torch.Tensor) -> torch.Tensor:
    """Written from OLMo's model.py without using any of the project's modules."""

    def rms(x, w=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps)
        return y * w if w is not None else y

    def bitlinear(x, w):
        xn = rms(x)
        sx = 127 / xn.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        xq = (xn * sx).round().clamp(-128, 127) / sx
        sw = 1 / w.abs().mean().clamp(min=1e-5)
        wq = (w * sw).round().clamp(-1, 1) / sw
        return xq @ wq.T

    def rope(t, pos):  # t: (B, H, T, hd); rotate-half: first half pairs with second half
        hd = t.shape[-1]
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        ang = pos[:, None].float() * inv[None]  # (T, hd/2)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    p = "model.transformer."
    B, T = ids.shape
    H, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    x = state[p + "wte.weight"][ids]
    pos = torch.arange(T)
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg.n_layers):
        b = f"{p}blocks.{i}."
        h = rms(x, state[b + "attn_norm.weight"])
        qkv = bitlinear(h, state[b + "att_proj.weight"])
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in qkv.split(cfg.d_model, -1))
        q, k = rope(q, pos), rope(k, pos)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + causal
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.d_model)
        x = x + bitlinear(y, state[b + "attn_out.weight"])
        h = rms(x, state[b + "ff_norm.weight"])
        up = bitlinear(h, state[b + "ff_proj.weight"])
        half = up.shape[-1] // 2
        x = x + bitlinear(F.silu(up[..., half:]) * up[..., :half], state[b + "ff_out.weight"])
    x = rms(x, state[p + "ln_f.weight"])
    return x @ state[p + "wte.weight"][: cfg.vocab_size].T


def _randomise_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))


def test_matches_independent_reference(tiny_llm):
    _randomise_norms(tiny_llm)
    ids = torch.randint(0, 100, (2, 11))
    ours = tiny_llm(ids, use_cache=False).logits
    ref = _reference_forward(tiny_llm.state_dict(), tiny_llm.config, ids)
    assert ours.shape == (2, 11, 100)
    assert torch.allclose(ours, ref, atol=2e-4), (ours - ref).abs().max()


def test_reference_catches_swapped_gate_and_interleaved_rope(tiny_llm):
    """The reference is sharp enough: swapping SwiGLU halves changes the logits."""
    _randomise_norms(tiny_llm)
    ids = torch.randint(0, 100, (1, 9))
    ours = tiny_llm(ids, use_cache=False).logits
    state = dict(tiny_llm.state_dict())
    for i in range(tiny_llm.config.n_layers):
        key = f"model.transformer.blocks.{i}.ff_proj.weight"
        w = state[key]
        state[key] = torch.cat([w[w.shape[0] // 2:], w[: w.shape[0] // 2]])
    swapped = _reference_forward(state, tiny_llm.config, ids)
    assert not torch.allclose(ours, swapped, atol=1e-2)


def test_kv_cache_generation_equals_full_recompute(tiny_llm):
    ids = torch.randint(2, 100, (1, 6))
    out = tiny_llm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)
    seq = ids
    for _ in range(8):
        nxt = tiny_llm(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_sdpa_and_eager_agree(tiny_llm):
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    sdpa = tiny_llm(ids, attention_mask=mask, use_cache=False).logits
    tiny_llm.set_attn_implementation("eager")
    eager = tiny_llm(ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(sdpa[:, 3:], eager[:, 3:], atol=1e-4)


def test_gradient_checkpointing_same_loss_and_grads(tiny_llm):
    ids = torch.randint(0, 100, (2, 12))
    tiny_llm.train()

    def loss_and_grads():
        tiny_llm.zero_grad(set_to_none=True)
        loss = tiny_llm(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_llm.named_parameters()}

    loss_plain, grads_plain = loss_and_grads()
    tiny_llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert tiny_llm.model.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert torch.allclose(loss_plain, loss_ckpt)
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], atol=1e-6), name


def test_save_and_from_pretrained(tiny_llm, tmp_path):
    tiny_llm.save_pretrained(tmp_path)
    again = OLMoBitNetForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 100, (1, 5))
    assert torch.equal(tiny_llm(ids).logits, again(ids).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=60, n_heads=8), "multiple of n_heads"),
        (dict(vocab_size=200, embedding_size=100), "embedding_size"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OLMoBitNetConfig(**{"d_model": 64, "n_heads": 4, "n_layers": 1, "vocab_size": 50, **kwargs})


def test_1b_shapes_on_meta():
    with torch.device("meta"):
        model = OLMoBitNetForCausalLM(OLMoBitNetConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.transformer.wte.weight"] == (50304, 2048)
    assert shapes["model.transformer.blocks.0.att_proj.weight"] == (6144, 2048)
    assert shapes["model.transformer.blocks.15.attn_out.weight"] == (2048, 2048)
    assert shapes["model.transformer.blocks.3.ff_proj.weight"] == (16384, 2048)
    assert shapes["model.transformer.blocks.3.ff_out.weight"] == (2048, 8192)
    assert sum(v.numel() for v in model.state_dict().values()) == 1_176_832_000
    assert len(shapes) == 1 + 16 * 6 + 1
