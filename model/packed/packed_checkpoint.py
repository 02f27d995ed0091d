"""Packed model folders: write, verify and load them (one call: `load_packed(folder)`).

A packed folder is a model folder (`model.checkpoint`) whose block linears are packed ternary:

    config.json                 the model's config (model_type bitllava or a backbone LLM's) plus a
                                "packing" section: format, version, the packed tensors' true
                                shapes, and every other file's size in bytes and sha256
    model.safetensors           <linear>.weight_packed  uint8, `model.packed.packing` layout of `format`
                                <linear>.weight_scale   float32 (1,), s_w (w_q = codes / s_w)
                                everything else (embedding, norms, vision tower, projector) bf16
    tokenizer files, preprocessor_config.json (multimodal)

`load_packed` re-hashes every listed file before reading any weight, so a truncated or altered
folder is a ValueError rather than a model serving garbage. 1.6-bit files are converted to the
2-bit runtime layout when loaded (`model.packed.packing.to_runtime`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.bitlinear import ternary_codes
from model.checkpoint import LoadedModel, config_from_dict, load_state_dict_strict, load_tokenizer, tied_weights
from model.multimodal import BitLlavaConfig, BitLlavaForConditionalGeneration
from model.packed.packed_linear import PackedBitLinear, pack_bitlinears, set_backend
from model.packed.packed_model import empty_packed_model, set_head
from model.packed.packing import FORMATS, PackedTernary, check_format, pack, packed_shape, to_runtime, unpack
from model.towers import load_image_processor

PACKING_VERSION = 1
WEIGHTS = "model.safetensors"
PACKED_SUFFIX, SCALE_SUFFIX = ".weight_packed", ".weight_scale"


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))


def packed_modules(model: torch.nn.Module) -> dict[str, PackedBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedBitLinear)}


def bf16_nbytes(model: torch.nn.Module) -> int:
    """Bytes of the same model with every weight in bf16 (block linears as dense (out, in) matrices)."""
    dense = sum(t.numel() for t in model.state_dict().values())
    linears = sum(m.in_features * m.out_features for m in packed_modules(model).values())
    return 2 * (dense + linears)


@torch.no_grad()
def save_packed(folder: str, model, tokenizer, image_processor=None, fmt: str = "2bit") -> dict:
    """Write a packed folder (BitLinear158 layers are packed first); returns config.json's "packing" section."""
    check_format(fmt)
    pack_bitlinears(model)
    modules = packed_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no BitLinear layers to pack")
    os.makedirs(folder, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, module in modules.items():
        packed = module.packed() if fmt == "2bit" else pack(module.codes(), fmt)
        tensors[name + PACKED_SUFFIX] = packed.data.contiguous()
        tensors[name + SCALE_SUFFIX] = torch.tensor([module.scale], dtype=torch.float32)
        shapes[name] = [module.out_features, module.in_features]
    tied = tied_weights(model)  # a tied head is stored once, as the embedding (as transformers does)
    for key, value in model.state_dict().items():
        if key in tied:
            continue
        tensors[key] = value.detach().to(torch.bfloat16 if value.is_floating_point() else value.dtype).contiguous().cpu()
    save_file(tensors, os.path.join(folder, WEIGHTS), metadata={"format": "bitllava-packed", "packing": fmt})
    tokenizer.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)

    raw = json.loads(model.config.to_json_string(use_diff=False))
    files = {
        f: {"bytes": os.path.getsize(os.path.join(folder, f)), "sha256": sha256_file(os.path.join(folder, f))}
        for f in sorted(os.listdir(folder))
        if f != "config.json" and os.path.isfile(os.path.join(folder, f))
    }
    weights = sum(math.prod(s) for s in shapes.values())
    code_bytes = sum(tensors[n + PACKED_SUFFIX].numel() for n in shapes)
    text = model.config.text_config if isinstance(model.config, BitLlavaConfig) else model.config
    packing = {
        "format": fmt,
        "version": PACKING_VERSION,
        "backbone": text.model_type,
        "bitlinear_weights": weights,
        "bitlinear_code_bytes": code_bytes,
        "bitlinear_scale_bytes": 4 * len(shapes),
        "other_dtype": "bfloat16",
        "tensors": shapes,
        "files": files,
    }
    raw["packing"] = packing
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    return packing


def read_packing(folder: str) -> tuple[dict, dict]:
    """(config without "packing", packing) of a packed folder; ValueError for anything else."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.isfile(path):
        raise ValueError(f"{folder} is not a model folder: no config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the packed folder is damaged; pack it again") from err
    packing = raw.pop("packing", None)
    if not isinstance(packing, dict):
        raise ValueError(
            f"{folder} is not a packed model folder (its config.json has no 'packing' section): "
            "load it with model.checkpoint.load_model, or pack it with `bitllava pack`"
        )
    if packing.get("version") != PACKING_VERSION:
        raise ValueError(f"{folder}: packing version {packing.get('version')!r} is not supported (expected {PACKING_VERSION})")
    if packing.get("format") not in FORMATS:
        raise ValueError(f"{folder}: unknown packing format {packing.get('format')!r} (expected one of {list(FORMATS)})")
    for key in ("tensors", "files"):
        if not isinstance(packing.get(key), dict):
            raise ValueError(f"{folder}: config.json's packing section lacks '{key}': the folder is damaged; pack it again")
    if WEIGHTS not in packing["files"]:
        raise ValueError(f"{folder}: config.json's packing section does not list {WEIGHTS}")
    return raw, packing


def verify_packed(folder: str, packing: dict) -> None:
    """Every listed file exists with its recorded size and sha256; ValueError naming the first that does not."""
    for name, want in packing["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"packed model {folder} is incomplete: {name} is missing; copy or pack it again")
        size = os.path.getsize(path)
        if size != want["bytes"]:
            raise ValueError(
                f"packed model {folder} is damaged: {name} is {size} bytes but config.json records {want['bytes']} "
                "(truncated or altered); copy or pack it again"
            )
        if sha256_file(path) != want["sha256"]:
            raise ValueError(
                f"packed model {folder} is damaged: the sha256 of {name} differs from config.json's "
                "(altered or corrupted); copy or pack it again"
            )


@torch.no_grad()
def load_packed_weights(model, folder: str, packing: dict) -> None:
    """Fill `model` (from `empty_packed_model`) from the folder's safetensors, refusing any mismatch by name."""
    fmt = packing["format"]
    modules = packed_modules(model)
    path = os.path.join(folder, WEIGHTS)
    try:
        handle = safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable safetensors file ({err}); pack the model again") from err
    with handle as f:
        keys = set(f.keys())
        missing = sorted(n + s for n in modules for s in (PACKED_SUFFIX, SCALE_SUFFIX) if n + s not in keys)
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise ValueError(f"packed model {folder} lacks packed BitLinear tensors: {shown}")
        for name, module in modules.items():
            shape = (module.out_features, module.in_features)
            if packing["tensors"].get(name) != list(shape):
                raise ValueError(
                    f"packed model {folder}: {name} is recorded as {packing['tensors'].get(name)} but the config "
                    f"needs {list(shape)}"
                )
            data = f.get_tensor(name + PACKED_SUFFIX)
            want = packed_shape(shape, fmt)
            if data.dtype != torch.uint8 or tuple(data.shape) != want:
                raise ValueError(
                    f"packed model {folder}: {name}{PACKED_SUFFIX} is {data.dtype} {tuple(data.shape)}, "
                    f"expected uint8 {want} for {fmt} codes of {shape}"
                )
            scale = f.get_tensor(name + SCALE_SUFFIX)
            if scale.numel() != 1 or not scale.is_floating_point():
                raise ValueError(f"packed model {folder}: {name}{SCALE_SUFFIX} must be one float, got {tuple(scale.shape)}")
            runtime = to_runtime(PackedTernary(data, shape, fmt))
            if runtime.data is data:  # own the bytes: nothing may keep the file mapped after loading
                runtime = PackedTernary(data.clone(), shape, "2bit")
            module.load_packed(runtime, scale.reshape(()))
        rest = {k: f.get_tensor(k) for k in keys if not k.endswith((PACKED_SUFFIX, SCALE_SUFFIX))}
    load_state_dict_strict(model, rest, folder)


def load_packed(
    folder: str,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    head: str = "dense",
    verify: bool = True,
) -> LoadedModel:
    """Load a packed folder in eval mode: the same `LoadedModel` as `model.checkpoint.load_model`.

    dtype: of the non-packed weights and of activations (bf16 as stored, or float32).
    backend: kernel of the packed linears ("auto" picks by device; see `model.packed.kernels`).
    head: "dense" (the tied embedding) or "int8" (an int8 copy with per-row scales).
    verify: re-hash every file against config.json first (a 1b folder takes about a second).
    """
    raw, packing = read_packing(folder)
    if verify:
        verify_packed(folder, packing)
    config = config_from_dict(raw, folder)
    model = empty_packed_model(config, dtype=dtype, initialise=False)
    load_packed_weights(model, folder, packing)
    model.eval()
    set_backend(model, backend)
    set_head(model, head, backend)
    multimodal = isinstance(model, BitLlavaForConditionalGeneration)
    tokenizer = load_tokenizer(folder)
    processor = load_image_processor(folder, config.vision_config) if multimodal else None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.packing = {k: packing[k] for k in ("format", "version")}
    return LoadedModel(model=model, tokenizer=tokenizer, image_processor=processor,
                       layout="bitllava" if multimodal else config.model_type)


@torch.no_grad()
def random_packed_model(config, seed: int = 0):
    """A packed model with random weights, one block linear at a time (for benchmarks).

    Each block weight is drawn N(0, init_std) in float32, quantised with `ternary_codes` and packed
    before the next is drawn, so the float block weights (4.3 GB for `1b`) never exist at once.
    """
    model = empty_packed_model(config)
    text = config.text_config if isinstance(config, BitLlavaConfig) else config
    std = getattr(text, "init_std", None) or getattr(text, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    for module in packed_modules(model).values():
        w = torch.empty(module.out_features, module.in_features).normal_(0.0, std, generator=generator)
        module.load_codes(*ternary_codes(w))
    return model


def unpacked_codes(folder: str) -> dict[str, tuple[torch.Tensor, float]]:
    """{linear name: (int8 codes, s_w)} of a packed folder (for inspection and tests)."""
    _, packing = read_packing(folder)
    out = {}
    with safe_open(os.path.join(folder, WEIGHTS), framework="pt") as f:
        for name, shape in packing["tensors"].items():
            data = f.get_tensor(name + PACKED_SUFFIX)
            out[name] = (unpack(PackedTernary(data, tuple(shape), packing["format"])), float(f.get_tensor(name + SCALE_SUFFIX)))
    return out
