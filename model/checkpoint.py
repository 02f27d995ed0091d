"""Model folders: save and load this project's models and the published LLM layouts.

These layouts load through `load_model`:
- this project's multimodal folder (`config.json` with model_type `bitllava`, safetensors,
  tokenizer and `preprocessor_config.json`), on any backbone of `model.backbones`;
- this project's LLM-only folder (model_type `olmo_bitnet`);
- the published OLMo-Bitnet-1B folder (OLMo's config.json field names, fp32 `pytorch_model.bin`
  or safetensors with `model.transformer.*` keys, tokenizer.json);
- a transformers `save_pretrained` folder of a Llama, Qwen2, OLMo, OLMo-2 or BitNet LLM (its own key
  names and tokenizer), loaded as the ternary backbone of that family.

Weights are loaded strictly: a missing, unexpected or mis-shaped tensor is a ValueError naming
the tensors (transformers' `from_pretrained` would only warn and initialise them randomly).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from model.backbones import BACKBONES, build_causal_lm, text_config_from_dict
from model.backbones.olmo_bitnet import OLMoBitNetConfig, OLMoBitNetForCausalLM
from model.multimodal import BitLlavaConfig, BitLlavaForConditionalGeneration
from model.tokenizer import olmo_tokenizer_file, with_image_token
from model.towers import build_tower, load_image_processor

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    model: BitLlavaForConditionalGeneration | PreTrainedModel  # the multimodal model or a backbone LM
    tokenizer: PreTrainedTokenizerFast
    image_processor: object | None  # the tower's image processor (model.towers)
    layout: str  # "bitllava" | "olmo_bitnet" | "olmo_published" | a transformers model_type (llama, ...)

    @property
    def multimodal(self) -> bool:
        return isinstance(self.model, BitLlavaForConditionalGeneration)


def is_hub_id(value: str) -> bool:
    """'owner/name' that names no local path: no leading '.', '/' or '~', exactly one '/', not a URI."""
    return (not os.path.exists(os.path.expanduser(value)) and not value.startswith((".", "/", "~"))
            and value.count("/") == 1 and "://" not in value)


def resolve_model_dir(path_or_hub_id: str) -> str:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded to the local cache."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if not is_hub_id(path_or_hub_id):
        raise ValueError(f"{path_or_hub_id!r} is not a model folder (and not an 'owner/name' hub id)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            path_or_hub_id,
            allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt"],
        )
    except _hub_errors() as err:
        raise ValueError(
            f"could not download {path_or_hub_id!r} from the Hugging Face hub ({_hub_failure(err)}); "
            "offline, give a local model folder"
        ) from err


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What `snapshot_download` raises when the hub (or the network to it) fails.

    huggingface_hub's own errors are OSError or ValueError subclasses (LocalEntryNotFoundError,
    HfHubHTTPError and its RepositoryNotFoundError / GatedRepoError / RevisionNotFoundError,
    OfflineModeIsEnabled, HFValidationError); the HTTP client's transport errors (httpx2 for
    huggingface_hub >= 1.0, httpx or requests before) are not all OSErrors, so they are added by name.
    """
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_failure(err: BaseException) -> str:
    """A short, one-line reason for a failed hub download (huggingface_hub's messages run to paragraphs)."""
    from huggingface_hub import constants, errors

    chain = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    offline = getattr(errors, "OfflineModeIsEnabled", ())
    if constants.is_offline_mode() or any(isinstance(e, offline) for e in chain):
        return "HF_HUB_OFFLINE is set and the model is not in the local cache"
    if isinstance(err, getattr(errors, "GatedRepoError", ())):
        return "the repository is gated: accept its terms on the hub and log in"
    if isinstance(err, getattr(errors, "RepositoryNotFoundError", ())):
        return "no such repository, or it is private and no valid token was given"
    if isinstance(err, getattr(errors, "RevisionNotFoundError", ())):
        return "no such revision"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, getattr(errors, "HfHubHTTPError", ())) and status is not None:
        return f"HTTP {status}"
    # the deepest error is the root cause (a connection refused, a timeout, a full disk, ...)
    root = chain[-1]
    lines = str(root).strip().splitlines()
    text = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a folder: safetensors (single or sharded) or pytorch_model.bin (weights_only)."""
    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not present:
        raise ValueError(f"{folder} holds no weights (looked for {', '.join(WEIGHT_FILES)})")
    name = present[0]
    path = os.path.join(folder, name)
    if name.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_one(os.path.join(folder, shard)))
        return state
    return _read_one(path)


def _read_one(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def tied_weights(model: torch.nn.Module) -> dict[str, str]:
    """{tied key: key it shares} for every sub-model that ties its output head to its input embedding
    (transformers' `_tied_weights_keys`, active when its config's tie_word_embeddings is set)."""
    tied = {}
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        config = getattr(module, "config", None)
        if isinstance(keys, dict) and getattr(config, "tie_word_embeddings", False):
            at = f"{prefix}." if prefix else ""
            tied.update({at + target: at + source for target, source in keys.items()})
    return tied


def retie(model: torch.nn.Module) -> None:
    """Make tied heads share their embedding's tensor again (moving a model off `meta` unties them)."""
    for target, source in tied_weights(model).items():
        owner, _, name = target.rpartition(".")
        setattr(model.get_submodule(owner), name, model.get_parameter(source))


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, refusing missing, unexpected and mis-shaped tensors with their names.

    A tied head's weight may be absent (transformers saves it once, as the embedding)."""
    expected = model.state_dict()
    tied = tied_weights(model)
    state = dict(state)
    for target, shared in tied.items():
        if target not in state and shared in state:
            state[target] = state[shared]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    retie(model)


def read_config(folder: str) -> dict:
    """A model folder's config.json; a missing or unreadable one is a ValueError naming the folder."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a model folder: no config.json")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as err:
            raise ValueError(f"{folder} is not a model folder: config.json is not JSON ({err})") from err


def _published_tokenizer(folder: str, config: OLMoBitNetConfig) -> PreTrainedTokenizerFast:
    path = os.path.join(folder, "tokenizer.json")
    tokenizer_file = path if os.path.isfile(path) else olmo_tokenizer_file()
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, model_max_length=config.max_sequence_length)
    tok.eos_token = tok.convert_ids_to_tokens(config.eos_token_id)
    tok.pad_token = tok.convert_ids_to_tokens(config.pad_token_id)
    return with_image_token(tok)


def config_from_dict(raw: dict, folder: str) -> PreTrainedConfig:
    """The config of this project's folder (bitllava, or an LLM of a registered backbone), else a ValueError."""
    model_type = raw.get("model_type")
    if model_type == "bitllava":
        return BitLlavaConfig.from_dict(raw)
    if model_type in BACKBONES:
        return text_config_from_dict(raw)
    raise ValueError(
        f"{folder}/config.json is neither a bitllava model nor an LLM of a supported backbone "
        f"(model_type={model_type!r}; supported: bitllava, {', '.join(sorted(BACKBONES))}, or an OLMo config)"
    )


def model_from_config(raw: dict, folder: str) -> tuple[torch.nn.Module, str]:
    """(freshly initialised model, layout) of a config.json dict, any supported layout."""
    if "d_model" in raw and "n_layers" in raw and raw.get("model_type") != "olmo_bitnet":
        # OLMo's published config.json (its model_type says "olmo" too); this project's own LM folders
        # (model_type olmo_bitnet, with fields such as qk_norm) go through config_from_dict
        return OLMoBitNetForCausalLM(OLMoBitNetConfig.from_olmo_config(raw)), "olmo_published"
    config = config_from_dict(raw, folder)
    if isinstance(config, BitLlavaConfig):
        return BitLlavaForConditionalGeneration(config), "bitllava"
    return build_causal_lm(config), config.model_type


def load_tokenizer(folder: str) -> PreTrainedTokenizerFast:
    """A folder's own (fast) tokenizer plus `<image>`; one without a pad token pads with its eos (Llama 3)."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise ValueError(f"{folder} has no tokenizer.json (a fast tokenizer is needed for label offsets)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    if tokenizer.eos_token is None:
        raise ValueError(f"{folder}'s tokenizer has no eos token: the templates end every answer with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return with_image_token(tokenizer)


def load_model(path_or_hub_id: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load any supported model folder (or hub id) in eval mode."""
    folder = resolve_model_dir(path_or_hub_id)
    raw = read_config(folder)
    model, layout = model_from_config(raw, folder)
    load_state_dict_strict(model, read_state_dict(folder), folder)
    model.to(dtype).eval()

    if layout == "olmo_published":
        tokenizer = _published_tokenizer(folder, model.config)
    else:
        tokenizer = load_tokenizer(folder)
    processor = load_image_processor(folder, model.config.vision_config) if layout == "bitllava" else None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, image_processor=processor, layout=layout)


def load_vision_tower(folder: str):
    """Only the vision tower of a bitllava folder (what cached-feature preprocessing runs), in eval mode."""
    from safetensors import safe_open

    raw = read_config(folder)
    if raw.get("model_type") != "bitllava":
        raise ValueError(f"{folder} is not a multimodal bitllava model folder")
    config = BitLlavaConfig.from_dict(raw)
    tower = build_tower(config.vision_config)
    prefix = "vision_tower."
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    else:
        state = {k[len(prefix):]: v for k, v in read_state_dict(folder).items() if k.startswith(prefix)}
    load_state_dict_strict(tower, state, f"{folder} (vision tower)")
    return tower.eval(), config


def save_model(folder: str, model, tokenizer, image_processor=None) -> None:
    """Write a loadable folder: config + safetensors weights, tokenizer, image processor."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
