"""Every backbone family on tiny random checkpoints in its published layout: it loads strictly as a
ternary LM, a multimodal model is composed on it (`<image>` in a spare or an added row), it packs, and
the packed model's logits match the unpacked ternary model's with identical greedy outputs. BitNet's
ternary forward matches a plain-PyTorch reference of the 2B-4T architecture written from the paper."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from components.pack import PackConfig, run_pack
from model.assemble import init_model
from model.backbones import BACKBONES, backbone
from model.bitlinear import BitLinear158
from model.chat import generate_reply
from model.checkpoint import load_model, save_model
from model.packed.packed_checkpoint import load_packed, read_packing
from model.packed.packed_linear import PackedBitLinear
from model.presets import describe
from tests.backbone_folders import FAMILIES, write_llm_folder
from tests.few_steps import train_a_few_steps
from tests.test_packed_model import image, round_to_bf16  # noqa: F401 - the same fixture and rounding

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def llm_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {family: write_llm_folder(str(root / family), family, seed=3) for family in FAMILY_NAMES}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_published_layout_loads_as_the_ternary_backbone(llm_folders, family):
    folder = llm_folders[family]
    loaded = load_model(folder)
    assert loaded.layout == family and not loaded.multimodal
    lm = loaded.model
    layers = lm.config.num_hidden_layers
    ternary = [n for n, m in lm.named_modules() if isinstance(m, BitLinear158)]
    assert len(ternary) == 7 * layers and all(".layers." in n for n in ternary)  # q k v o gate up down
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.model.layers.modules())
    assert isinstance(lm.lm_head, torch.nn.Linear) and isinstance(lm.model.embed_tokens, torch.nn.Embedding)
    assert {m.input_norm for m in lm.modules() if isinstance(m, BitLinear158)} == {family != "bitnet"}
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    state = lm.state_dict()
    for key, tensor in saved.items():  # the published key names, the published tensors
        assert torch.equal(state[key], tensor), key
    tied = lm.config.tie_word_embeddings
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    assert ("lm_head.weight" in saved) == (not tied)
    if family == "qwen2":
        assert lm.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases, full precision


@pytest.mark.parametrize("family", ["llama", "bitnet"])
def test_unknown_or_missing_tensors_are_refused_by_name(llm_folders, family, tmp_path):
    import shutil

    folder = tmp_path / family
    shutil.copytree(llm_folders[family], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_model(str(folder))
    assert "missing: model.layers.1.mlp.down_proj.weight" in str(err.value)
    assert "unexpected: model.layers.0.self_attn.extra_proj.weight" in str(err.value)


def bitnet_reference_logits(state: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 2B-4T from its technical report (Ma et al., 2025) and the published config: pre-norm
    blocks, RoPE, grouped-query attention, SubLN (an RMSNorm before o_proj and before down_proj), squared
    ReLU gated MLP, tied head; every block linear absmean-ternary weights times absmax int8 activations,
    quantising its input as it comes (no norm of its own). Plain tensors, no transformers code."""
    eps, d, heads, kv = config["rms_norm_eps"], config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = d // heads

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def bitlinear(x, w):
        s_x = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        x_q = (x * s_x).round().clamp(-128, 127) / s_x
        s_w = 1.0 / w.abs().mean().clamp(min=1e-5)
        return x_q @ ((w * s_w).round().clamp(-1, 1) / s_w).T

    T = ids.shape[1]
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]  # the 2B-4T file / transformers 5
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(T).float()[:, None] * inv  # (T, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # (H, T, hd), rotate-half layout
        half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + half * sin

    x = state["model.embed_tokens.weight"][ids[0]]  # (T, d)
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q = bitlinear(h, state[p + "self_attn.q_proj.weight"]).view(T, heads, hd).transpose(0, 1)
        k = bitlinear(h, state[p + "self_attn.k_proj.weight"]).view(T, kv, hd).transpose(0, 1)
        v = bitlinear(h, state[p + "self_attn.v_proj.weight"]).view(T, kv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)  # GQA
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, -1) @ v  # (H, T, hd)
        att = rms(att.transpose(0, 1).reshape(T, d), state[p + "self_attn.attn_sub_norm.weight"])  # SubLN
        x = x + bitlinear(att, state[p + "self_attn.o_proj.weight"])
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        g = torch.relu(bitlinear(h, state[p + "mlp.gate_proj.weight"])).pow(2) * bitlinear(h, state[p + "mlp.up_proj.weight"])
        g = rms(g, state[p + "mlp.ffn_sub_norm.weight"])  # SubLN
        x = x + bitlinear(g, state[p + "mlp.down_proj.weight"])
    x = rms(x, state["model.norm.weight"])
    return (x @ state["model.embed_tokens.weight"].T)[None]  # tied head


def test_bitnet_ternary_forward_matches_a_plain_reference_of_the_2b4t_architecture(llm_folders):
    folder = llm_folders["bitnet"]
    config = json.loads(open(f"{folder}/config.json").read())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA is exercised
    state = load_file(f"{folder}/model.safetensors")
    loaded = load_model(folder)
    ids = torch.tensor([[5, 77, 300, 12, 9, 640, 41, 3, 250, 18]])
    with torch.no_grad():
        got = loaded.model(ids).logits
    torch.testing.assert_close(got, bitnet_reference_logits(state, config, ids), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def composed(llm_folders, tmp_path_factory):
    """{family: multimodal folder} composed with `init_model` (what `bitllava model init --llm` runs)."""
    root = tmp_path_factory.mktemp("composed")
    out = {}
    for family, folder in llm_folders.items():
        model, tokenizer, processor = init_model("tiny", seed=1, llm=folder)
        round_to_bf16(model)
        out[family] = str(root / family)
        save_model(out[family], model, tokenizer, processor)
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_multimodal_model_is_composed_on_every_backbone(llm_folders, composed, family):
    base = load_model(llm_folders[family])
    loaded = load_model(composed[family])
    assert loaded.multimodal and loaded.model.config.text_config.model_type == family
    model, tok = loaded.model, loaded.tokenizer
    text = model.config.text_config
    assert model.multi_modal_projector.linear_2.out_features == text.hidden_size
    image_id = model.config.image_token_id
    assert image_id == tok.convert_tokens_to_ids("<image>") and tok.eos_token == base.tokenizer.eos_token
    rows = base.model.config.vocab_size
    embed = model.language_model.get_input_embeddings().weight
    if family == "qwen2":  # the published embedding is padded past the tokenizer: <image> takes a spare row
        assert image_id < rows and embed.shape[0] == rows
    else:  # one row added, initialised to the mean row (bf16-rounded like every weight here)
        assert image_id == rows and embed.shape[0] == rows + 1
        mean = base.model.get_input_embeddings().weight.mean(0)
        torch.testing.assert_close(embed[image_id], mean.bfloat16().float(), rtol=0, atol=1e-2)
        head = model.language_model.get_output_embeddings().weight
        assert head.shape[0] == rows + 1
    # the LM's weights are the published ones
    for key, tensor in base.model.state_dict().items():
        mine = model.language_model.state_dict()[key]
        assert torch.equal(mine[: tensor.shape[0]], tensor.bfloat16().float()), key


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_backbone_learns_through_its_ternary_linears(composed, family, image):
    """A few optimizer steps on one image-and-answer sample: the straight-through gradients reach every
    BitLinear (full-precision biases and q/k norms included) and the projector, and the loss falls."""
    def gradients_reach_every_trained_weight(model):
        ternary = [m for m in model.language_model.modules() if isinstance(m, BitLinear158)]
        assert len(ternary) == 14 and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
                                          for m in ternary)
        assert all(m.bias.grad.abs().sum() > 0 for m in ternary if m.bias is not None)
        assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0

    losses = train_a_few_steps(load_model(composed[family]), image,
                               after_first_backward=gradients_reach_every_trained_weight)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] * 0.8, losses


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_backbone_packs_with_the_same_logits_and_greedy_output(composed, family, tmp_path, image):
    from model.vision import preprocess_images

    report = run_pack(PackConfig(out=str(tmp_path / "packed"), checkpoint=composed[family]))
    _, packing = read_packing(report["out"])
    assert packing["backbone"] == family
    dense = load_model(composed[family])
    packed = load_packed(report["out"], dtype=torch.float32)
    assert packed.multimodal and sum(isinstance(m, PackedBitLinear) for m in packed.model.modules()) == 14
    config = dense.model.config
    ids = torch.tensor([[config.image_token_id] * config.num_image_tokens
                        + dense.tokenizer("a red square", add_special_tokens=False)["input_ids"]])
    pixels = preprocess_images([image], dense.image_processor)
    with torch.no_grad():
        got, want = packed.model(ids, pixel_values=pixels).logits, dense.model(ids, pixel_values=pixels).logits
        # the same function up to float rounding order ((x_i @ codes) / (s_x s_w) against x_i / s_x @ codes / s_w):
        # a last-bit difference can move one int8 activation across a rounding boundary, and from there later
        # positions differ by ~1e-3 (measured on OLMo-2, whose BitLinears see raw residuals); greedy must agree
        assert (got - want).abs().mean() < 1e-3, (got - want).abs().mean()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
        kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(packed.model.generate(ids, pixel_values=pixels, **kwargs),
                           dense.model.generate(ids, pixel_values=pixels, **kwargs))
    assert (generate_reply(packed, "What is in the picture?", [image], max_new_tokens=8).token_ids
            == generate_reply(dense, "What is in the picture?", [image], max_new_tokens=8).token_ids)
    int8 = load_packed(report["out"], dtype=torch.float32, head="int8")
    with torch.no_grad():
        close = torch.nn.functional.cosine_similarity(int8.model(ids, pixel_values=pixels).logits.flatten(),
                                                      dense.model(ids, pixel_values=pixels).logits.flatten(), dim=0)
    assert close > 0.999


def test_bitnet_2b4t_preset_counts_match_the_published_model():
    info = describe("bitnet-2b-4t")
    d, inter, layers, kv_dim, vocab = 2560, 6912, 30, 640, 128256
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * inter  # q, o, k, v; gate, up, down
    assert info["bitlinear_weights"] == layers * per_layer == 2_084_044_800
    norms = layers * (3 * d + inter) + d  # input, post-attention, attn SubLN, ffn SubLN; final
    assert info["llm_params_published"] == vocab * d + layers * per_layer + norms == 2_412_820_480
    assert round(info["llm_params_published"] / 1e9, 2) == 2.41  # the published size: 2.41B parameters
    assert info["llm_params"] == info["llm_params_published"] + d  # the <image> row (tied head)
    assert info["image_token_id"] == vocab and info["backbone"] == "bitnet" and info["n_kv_heads"] == 5
    assert backbone("bitnet").bitlinear_input_norm is False


def test_unsupported_backbone_is_named():
    with pytest.raises(ValueError, match="unsupported language model type 'gpt2'"):
        backbone("gpt2")
    assert set(BACKBONES) == {"olmo_bitnet", *FAMILY_NAMES}
