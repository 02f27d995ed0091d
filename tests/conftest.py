"""Shared fixtures: tiny models and tokenizers built in-process (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from model.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
from model.presets import build_from_preset
from model.tokenizer import build_tiny_tokenizer, load_olmo_tokenizer


@pytest.fixture(scope="session")
def olmo_tokenizer():
    return load_olmo_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llm() -> OLMoBitNetForCausalLM:
    torch.manual_seed(0)
    config = OLMoBitNetConfig(d_model=64, n_heads=4, n_layers=2, mlp_ratio=8, vocab_size=100, embedding_size=128,
                              max_sequence_length=128, eos_token_id=0, pad_token_id=1)
    return OLMoBitNetForCausalLM(config).eval()


@pytest.fixture
def tiny_mm():
    """(model, tokenizer, image_processor) of the tiny preset, random weights, eval mode."""
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    return model.eval(), tokenizer, processor
