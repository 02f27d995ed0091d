"""One loader for every kind of model folder: `load_any_model(path_or_hub_id)`.

- a packed folder written by `bitllava pack` (config.json with a "packing" section)
  -> `model.packed.packed_checkpoint.load_packed`;
- anything else (this project's multimodal or LLM-only checkpoint folder, the published
  OLMo-Bitnet-1B layout, or an 'owner/name' hub id) -> `model.checkpoint.load_model`.

Both return the same `LoadedModel`, so `model.chat.generate_reply`, evaluation and the CLI take
either without knowing which it is.
"""

from __future__ import annotations

import json
import os

import torch

from model.checkpoint import LoadedModel, load_model

DEFAULT_DTYPE = torch.float32


def is_packed_folder(path: str) -> bool:
    """A folder written by `bitllava pack`: its config.json has a "packing" section (format, version, ...)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return isinstance(config, dict) and isinstance(config.get("packing"), dict)


def load_any_model(path_or_hub_id: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a packed folder, a checkpoint folder or a hub id, in eval mode.

    dtype: of the weights and activations outside the packed ternary linears. None means float32
    for both kinds (what `bitllava generate` uses): a packed model then computes the same function
    as the checkpoint it was packed from (int8 activations times ternary codes, float32 elsewhere),
    so greedy decoding picks the same token ids. That parity is exact when the checkpoint's
    non-ternary weights (embedding, norms, vision tower, projector) are exactly representable in
    bf16, the precision a packed folder stores them in; a float32 checkpoint loses their low bits
    when packed, and near-tied logits can then decode differently.
    Pass torch.bfloat16 for a packed model's stored precision (half the memory for those weights,
    faster on GPU), at the cost of logits that differ slightly from the checkpoint's.
    `model.packed.packed_checkpoint.load_packed` called directly keeps its own bf16 default.
    """
    dtype = DEFAULT_DTYPE if dtype is None else dtype
    if is_packed_folder(path_or_hub_id):
        from model.packed.packed_checkpoint import load_packed  # imported late: it pulls in the kernels

        return load_packed(path_or_hub_id, dtype=dtype)
    return load_model(path_or_hub_id, dtype=dtype)
