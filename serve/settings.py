"""Settings of the Serve application: the `args` of a Serve config file (serve/serve.yaml).

`ServeSettings.from_args(args)` validates the dict Serve hands to `build_app(args)`; unknown keys
and bad values are ValueErrors naming the key. Replica counts, autoscaling and resources are not
here: they are Serve's own per-deployment settings (the `deployments:` section of the same file).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

DTYPES = ("auto", "bfloat16", "float32")
HEADS = ("dense", "int8")
BACKENDS = ("auto", "cpu", "triton", "reference")


def from_mapping(cls, data, where: str):
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**data)


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class Limits:
    """What one request may ask for; anything beyond is refused with a 4xx before it reaches the model.

    max_request_bytes: size of the HTTP request body (413 beyond it).
    max_image_bytes: size of one decoded image file (base64 data URL or fetched URL).
    max_image_pixels: width x height of one image, read from its header before decoding
        (a decompression bomb is refused without being decompressed).
    max_images: images in one request.
    max_prompt_tokens: prompt length in tokens, image positions included (each image takes the
        model's `num_image_tokens`); the model's context length bounds it too.
    max_tokens: the largest `max_tokens` a request may ask for.
    default_max_tokens: `max_tokens` of a request that gives none (shortened to fit the context).
    image_fetch_timeout_s: timeout of fetching an allowlisted remote image URL.
    """

    max_request_bytes: int = 16 * 2**20
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    default_max_tokens: int = 256
    image_fetch_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "image_fetch_timeout_s":
                _positive_int(getattr(self, f.name), f"limits.{f.name}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"limits.default_max_tokens ({self.default_max_tokens}) exceeds limits.max_tokens "
                             f"({self.max_tokens})")
        if not isinstance(self.image_fetch_timeout_s, (int, float)) or self.image_fetch_timeout_s <= 0:
            raise ValueError(f"limits.image_fetch_timeout_s must be a positive number, got {self.image_fetch_timeout_s!r}")


@dataclass
class EngineSettings:
    """The model replica's batching engine (serve/engine.py) and how it loads the packed model.

    max_batch_size: requests decoded together in one step; more wait in the replica's queue.
        Keep it at least the deployment's max_ongoing_requests.
    max_prefill_tokens: padded tokens of one prefill step (newcomers beyond it wait a step).
    batch_wait_ms: when idle, how long the first request waits for others to share its prefill.
    dtype: activations and non-packed weights: "bfloat16" (as stored), "float32" (numerically
        closest to training; on CPUs without bf16 units also the faster), or "auto": bfloat16
        on a GPU and on a CPU with native bf16 (avx512_bf16 / amx_bf16), else float32 (`model.precision`).
    backend: kernel of the packed linears (`model.packed.kernels`: auto picks by device).
    head: output head, "dense" (the tied embedding) or "int8" (per-row int8 copy).
    device: "auto" (cuda when the replica has a GPU, else cpu), "cpu" or "cuda".
    torch_threads: compute threads of the replica (None: its ray_actor_options.num_cpus rounded up).
    """

    max_batch_size: int = 8
    max_prefill_tokens: int = 16384
    batch_wait_ms: float = 5.0
    dtype: str = "auto"
    backend: str = "auto"
    head: str = "dense"
    device: str = "auto"
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        _positive_int(self.max_batch_size, "engine.max_batch_size")
        _positive_int(self.max_prefill_tokens, "engine.max_prefill_tokens")
        if not isinstance(self.batch_wait_ms, (int, float)) or self.batch_wait_ms < 0:
            raise ValueError(f"engine.batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        for name, allowed in (("dtype", DTYPES), ("backend", BACKENDS), ("head", HEADS),
                              ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"engine.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.torch_threads is not None:
            _positive_int(self.torch_threads, "engine.torch_threads")


@dataclass
class ServeSettings:
    """The application's `args`.

    model: the packed model folder (`bitllava pack` output), a local path or s3://bucket/prefix
        (copied to `cache_dir` on each replica; AWS_* variables reach S3-compatible stores).
    model_name: the id clients pass as `model` and `GET /v1/models` lists.
    api_key_env: name of an environment variable holding the API key; when given, every
        /v1 request needs `Authorization: Bearer <key>` and a replica refuses to start if the
        variable is unset or empty (never serves open by accident).
    api_key: the key itself (local use and tests; prefer api_key_env for real deployments).
    image_url_allowlist: URL prefixes (scheme://host[:port][/path]) of remote images the server may
        fetch; empty (the default) refuses every http(s) image URL: clients send data URLs.
    cache_dir: where replicas copy an s3:// model (default ~/.cache/bitllava/models).
    limits: per-request limits (`Limits`).
    engine: the model replica's engine (`EngineSettings`).
    """

    model: str
    model_name: str = "bitllava"
    api_key_env: str | None = None
    api_key: str | None = None
    image_url_allowlist: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    limits: Limits = field(default_factory=Limits)
    engine: EngineSettings = field(default_factory=EngineSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("args.model must name the packed model folder (a path or s3:// URI)")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError("args.model_name must be a non-empty string")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("args.api_key must be a non-empty string when given")
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give args.api_key or args.api_key_env, not both")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str) or not self.api_key_env):
            raise ValueError("args.api_key_env must name an environment variable")
        if not isinstance(self.image_url_allowlist, list):
            raise ValueError("args.image_url_allowlist must be a list of URL prefixes")
        for prefix in self.image_url_allowlist:
            parsed = urlparse(prefix) if isinstance(prefix, str) else None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"args.image_url_allowlist entry {prefix!r} must be an http(s)://host[/path] prefix")
        self.limits = from_mapping(Limits, self.limits, "args.limits")
        self.engine = from_mapping(EngineSettings, self.engine, "args.engine")

    @classmethod
    def from_args(cls, args: dict) -> "ServeSettings":
        """Validate the `args` mapping of a Serve config file."""
        if isinstance(args, ServeSettings):
            return args
        if not isinstance(args, dict):
            raise ValueError(f"the application args must be a mapping, got {type(args).__name__}")
        return from_mapping(cls, args, "args")

    def to_args(self) -> dict:
        """Plain dict (what travels to the replicas)."""
        return dataclasses.asdict(self)

    def resolve_api_key(self) -> str | None:
        """The key requests must carry, or None for an open endpoint; ValueError if api_key_env is unset."""
        if self.api_key_env is None:
            return self.api_key
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ValueError(f"args.api_key_env names {self.api_key_env!r} but that environment variable is unset or "
                             "empty on this replica; set it (e.g. from a Kubernetes Secret) or drop api_key_env")
        return key
