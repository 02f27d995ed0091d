"""Pipeline step "pack": a trained checkpoint (or a preset with random weights) -> packed model folder.

BitLinear weights become ternary codes, 2-bit (4 per byte) or 1.6-bit (5 per byte), with one
float32 scale per tensor; everything else is stored in bf16 (DESIGN.md section 7, the format is
described in `model.packed.packed_checkpoint`). The folder is written under a temporary name and renamed
when complete, so an interrupted run never leaves a half-written model under `out`.

Entry point: `run_pack(PackConfig(...)) -> report` (the report is what `bitllava pack` prints).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

import torch

from components import paths
from model.checkpoint import load_model
from model.packed.packed_checkpoint import bf16_nbytes, folder_bytes, random_packed_model, read_packing, save_packed
from model.packed.packing import check_format
from model.presets import get_preset, preset_config


@dataclass
class PackConfig:
    """What to pack and where.

    out: the packed model folder to write (must not exist, or be a packed folder with overwrite).
    checkpoint: model folder or hub id to pack (this project's layout or published OLMo-Bitnet-1B).
    preset: instead of a checkpoint, a preset ("tiny", "1b") with random weights, for benchmarks.
    format: "2bit" (4 codes per byte) or "1.6bit" (5 codes per byte, base 3).
    seed: random weights' seed (preset only).
    llm_only: with a preset, pack only its language model (layout olmo_bitnet).
    overwrite: replace `out` when it already holds a packed model.
    """

    out: str
    checkpoint: str | None = None
    preset: str | None = None
    format: str = "2bit"
    seed: int = 0
    llm_only: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_format(self.format)
        self.out, self.checkpoint = paths.local_path(self.out), paths.model_ref(self.checkpoint)
        if (self.checkpoint is None) == (self.preset is None):
            raise ValueError("give exactly one of a checkpoint to pack or --preset NAME (random weights)")
        if self.preset is not None:
            get_preset(self.preset)
        elif self.llm_only:
            raise ValueError("llm_only applies to presets; a checkpoint is packed as it is")
        if not self.out:
            raise ValueError("the output folder must be given")
        if self.checkpoint is not None and os.path.abspath(self.checkpoint) == os.path.abspath(self.out):
            raise ValueError(f"the output folder {self.out} is the checkpoint itself; choose another folder")


def _prepare_out(config: PackConfig) -> None:
    out = config.out
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    if not os.path.isdir(out):
        raise ValueError(f"{out} exists and is not a folder")
    if not config.overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a new folder (or --overwrite a packed model folder)")
    read_packing(out)  # only a packed model folder may be replaced
    shutil.rmtree(out)


def _load_source(config: PackConfig):
    """(model, tokenizer, image_processor, source label) of the checkpoint or the random preset."""
    if config.preset is not None:
        model_config, tokenizer = preset_config(config.preset)
        if config.llm_only:
            model_config = model_config.text_config
        model = random_packed_model(model_config, seed=config.seed)
        processor = None
        if not config.llm_only:
            from model.towers import build_image_processor

            processor = build_image_processor(model_config.vision_config)
        return model, tokenizer, processor, f"preset:{config.preset}"
    path = os.path.join(config.checkpoint, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            try:
                if "packing" in json.load(f):
                    raise ValueError(f"{config.checkpoint} is already a packed model folder; pack its trained checkpoint")
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
    try:
        loaded = load_model(config.checkpoint, dtype=torch.float32)
    except ValueError as err:
        raise ValueError(f"cannot pack {config.checkpoint}: {err}") from err
    return loaded.model, loaded.tokenizer, loaded.image_processor, config.checkpoint


def run_pack(config: PackConfig) -> dict:
    """Pack and return the report: sizes, bits per BitLinear weight, and the same model's bf16 bytes."""
    start = time.perf_counter()
    _prepare_out(config)
    model, tokenizer, processor, source = _load_source(config)
    staging = os.path.abspath(config.out).rstrip(os.sep) + f".packing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        packing = save_packed(staging, model, tokenizer, processor, config.format)
        bf16_bytes = bf16_nbytes(model)
        if os.path.isdir(config.out):
            os.rmdir(config.out)  # empty (checked above)
        os.replace(staging, config.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    weights, code_bytes, scale_bytes = (packing[k] for k in ("bitlinear_weights", "bitlinear_code_bytes", "bitlinear_scale_bytes"))
    total = folder_bytes(config.out)
    return {
        "source": source,
        "out": config.out,
        "format": config.format,
        "layout": model.config.model_type,
        "bitlinear_layers": len(packing["tensors"]),
        "bitlinear_weights": weights,
        "bitlinear_code_bytes": code_bytes,
        "bitlinear_scale_bytes": scale_bytes,
        "bitlinear_bits_per_weight": round(8 * code_bytes / weights, 6),
        "bitlinear_bits_per_weight_with_scales": round(8 * (code_bytes + scale_bytes) / weights, 6),
        "folder_bytes": total,
        "bf16_bytes": bf16_bytes,
        "bf16_over_packed": round(bf16_bytes / total, 3),
        "seconds": round(time.perf_counter() - start, 1),
    }
