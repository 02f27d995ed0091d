"""Chameleon's QK-norm on the OLMo-Bitnet LM (`qk_norm: true`): per-head RMSNorms on queries and keys,
saved and loaded with the model, trained through, packed (as full-precision weights beside the ternary
ones) with packed logits equal to the unpacked model's; refused where it would change a pretrained LM."""

import pytest
import torch

from components.pack import PackConfig, run_pack
from model.assemble import init_model
from model.checkpoint import load_model, save_model
from model.packed.packed_checkpoint import load_packed
from tests.few_steps import answer_sample, train_a_few_steps
from tests.test_packed_model import image, round_to_bf16  # noqa: F401 - the same fixture and rounding


@pytest.fixture(scope="module")
def qk_folder(tmp_path_factory):
    model, tokenizer, processor = init_model("tiny", seed=4, qk_norm=True)
    with torch.no_grad():  # trained-looking norm weights, so that a lost or misplaced norm shows
        for block in model.language_model.model.transformer.blocks:
            block.q_norm.weight.uniform_(0.5, 1.5)
            block.k_norm.weight.uniform_(0.5, 1.5)
    round_to_bf16(model)
    folder = str(tmp_path_factory.mktemp("qk") / "model")
    save_model(folder, model, tokenizer, processor)
    return folder


def test_qk_norm_is_saved_and_normalises_each_heads_queries_and_keys(qk_folder):
    loaded = load_model(qk_folder)
    text = loaded.model.config.text_config
    assert text.qk_norm is True
    block = loaded.model.language_model.model.transformer.blocks[0]
    assert block.q_norm.weight.shape == block.k_norm.weight.shape == (text.head_dim,)
    q = torch.randn(2, text.n_heads, 5, text.head_dim) * 30  # large queries come out at the weight's scale
    normed = block.q_norm(q) / block.q_norm.weight
    torch.testing.assert_close(normed.pow(2).mean(-1), torch.ones(2, text.n_heads, 5), rtol=1e-4, atol=1e-4)
    plain, _, _ = init_model("tiny", seed=4)
    assert not hasattr(plain.language_model.model.transformer.blocks[0], "q_norm")  # off by default


def test_a_qk_norm_model_learns_through_its_norms(qk_folder, image):
    def norms_get_gradients(model):
        block = model.language_model.model.transformer.blocks[0]
        assert block.q_norm.weight.grad.abs().sum() > 0 and block.k_norm.weight.grad.abs().sum() > 0

    losses = train_a_few_steps(load_model(qk_folder), image, after_first_backward=norms_get_gradients)
    assert losses[-1] < losses[0] * 0.8, losses


def test_a_qk_norm_model_packs_with_the_same_logits(qk_folder, image, tmp_path):
    report = run_pack(PackConfig(out=str(tmp_path / "packed"), checkpoint=qk_folder))
    dense = load_model(qk_folder)
    packed = load_packed(report["out"], dtype=torch.float32)
    assert packed.model.config.text_config.qk_norm is True
    ids, _, pixels = answer_sample(dense, image)
    with torch.no_grad():
        got, want = packed.model(ids, pixel_values=pixels).logits, dense.model(ids, pixel_values=pixels).logits
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
        assert (got - want).abs().mean() < 1e-3
        kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(packed.model.generate(ids, pixel_values=pixels, **kwargs),
                           dense.model.generate(ids, pixel_values=pixels, **kwargs))
        # the norms matter: without them the packed model answers differently
        for block in packed.model.language_model.model.transformer.blocks:
            block.q_norm.weight.fill_(1.0)
        assert (packed.model(ids, pixel_values=pixels).logits - want).abs().max() > 1e-2


def test_qk_norm_is_refused_where_it_would_change_a_pretrained_lm(tmp_path):
    from pipelines.config import PipelineConfig

    with pytest.raises(ValueError, match="fresh LM"):
        init_model("tiny", qk_norm=True, llm=str(tmp_path))
    with pytest.raises(ValueError, match="OLMo-Bitnet presets"):
        init_model("bitnet-2b-4t", qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        PipelineConfig(name="x", preset="tiny", out=str(tmp_path), qk_norm=True, llm=str(tmp_path),
                       data={"synth": {"records": 10}})


def test_model_init_qk_norm_as_a_user_runs_it(tmp_path):
    import json
    import os
    import subprocess
    import sys

    bitllava = os.path.join(os.path.dirname(sys.executable), "bitllava")
    proc = subprocess.run([bitllava, "model", "init", "--preset", "tiny", "--qk-norm", "--out", "base"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["model_dir"] == str(tmp_path / "base")
    assert load_model(str(tmp_path / "base")).model.config.text_config.qk_norm is True
    refused = subprocess.run([bitllava, "model", "init", "--preset", "tiny", "--qk-norm", "--llm", "base", "--out",
                              "x"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "fresh LM" in refused.stderr


def test_an_llm_only_folder_keeps_its_qk_norm(qk_folder, tmp_path):
    lm = load_model(qk_folder)
    save_model(str(tmp_path / "lm"), lm.model.language_model, lm.tokenizer)
    loaded = load_model(str(tmp_path / "lm"))  # this project's olmo_bitnet layout, not OLMo's published one
    assert not loaded.multimodal and loaded.model.config.qk_norm is True
    want = lm.model.language_model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())
