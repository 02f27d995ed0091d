"""The whole pipeline in one YAML: data, preprocessing, both training phases, evaluation, packing, serving.

`load_pipeline_config(path)` reads and validates it; every shipped file in pipelines/configs/ is
loaded by a test. Every section is a dataclass whose defaults live here once. Local paths in the YAML
(and in overrides such as `--out`) are relative to the working directory of the command that reads
it, as in the user's shell, and are made absolute here, before anything reaches a Ray task, actor or
Train worker; `s3://` URIs and hub ids pass through. Only `align.config` / `instruct.config` are
relative to pipelines/configs/ (they name shipped training YAMLs).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from components import paths
from components.evaluate.tasks import TASK_NAMES
from components.yaml_fields import load_fields
from serve.settings import from_mapping  # stdlib only: the one mapping -> dataclass check

ROOT = paths.PROJECT_ROOT
EVAL_TASKS = TASK_NAMES
ENCODINGS = ("pixels", "features")
PACK_FORMATS = ("2bit", "1.6bit")


@dataclass
class DataSources:
    """Where the raw data comes from.

    synth: generate data with `bitllava data synth` settings ({records, instruct_images, eval, corrupt}); or null.
    cc595k: {json, images} of LLaVA-CC3M-Pretrain-595K (used when synth is null).
    instruct: {json, images} of LLaVA-Instruct-150K (used when synth is null).
    eval: per task, the files `bitllava eval run` takes: {pope: {annotations: [...], images}, vqav2: {questions,
      annotations, images}, textvqa: {annotations, ocr, images, protocol}, gqa / scienceqa / mme / seed / mmbench:
      {annotations, ...}}; paths are resolved, `protocol` is a name.
    """

    synth: dict | None = None
    cc595k: dict | None = None
    instruct: dict | None = None
    eval: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.synth is None and not (self.cc595k and self.instruct):
            raise ValueError("data needs either `synth` settings or both `cc595k` and `instruct` sources")
        for name in ("cc595k", "instruct"):
            src = getattr(self, name)
            if src is not None:
                if set(src) != {"json", "images"}:
                    raise ValueError(f"data.{name} needs exactly `json` and `images`, got {sorted(src)}")
                setattr(self, name, {k: paths.local_path(v) for k, v in src.items()})
        self.eval = {task: {k: v if k == "protocol" else paths.local_paths(v) if isinstance(v, list)
                            else paths.local_path(v) for k, v in files.items()} for task, files in self.eval.items()}


@dataclass
class PreprocessSettings:
    """encode_align / encode_instruct: pixels, or features (cached frozen-tower features; the phase then skips
    the tower). shard_records: records per Parquet part. max_length: token limit (None: the preset's)."""

    encode_align: str = "pixels"
    encode_instruct: str = "pixels"
    shard_records: int = 256
    max_length: int | None = None

    def __post_init__(self):
        for key in ("encode_align", "encode_instruct"):
            if getattr(self, key) not in ENCODINGS:
                raise ValueError(f"preprocess.{key} must be one of {ENCODINGS}")

    def encode(self, phase: str) -> str:
        return getattr(self, f"encode_{phase}")


@dataclass
class EvalSettings:
    """tasks: of EVAL_TASKS. limit: first N questions per split. num_actors: model replicas. batch_size: per call.
    protocols: prompt protocol per task that has several (e.g. {textvqa: no-ocr}); default: LLaVA-1.5's."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    num_actors: int = 1
    batch_size: int = 8
    protocols: dict = field(default_factory=dict)

    def __post_init__(self):
        from components.evaluate.tasks import TASKS

        bad = [t for t in self.tasks if t not in EVAL_TASKS]
        if bad:
            raise ValueError(f"unknown eval tasks {bad}; choose from {EVAL_TASKS}")
        for task, protocol in self.protocols.items():
            choices = TASKS[task].protocols if task in TASKS else ()
            if protocol not in choices:
                raise ValueError(f"eval.protocols: {task!r} has no protocol {protocol!r}"
                                 + (f"; choose one of {', '.join(choices)}" if choices else " (it has one prompt)"))


@dataclass
class PackSettings:
    """format: 2bit (4 codes per byte) or 1.6bit (5 per byte)."""

    format: str = "2bit"

    def __post_init__(self):
        if self.format not in PACK_FORMATS:
            raise ValueError(f"pack.format must be one of {PACK_FORMATS}")


@dataclass
class ServeSettings:
    """config: Serve config file (default serve/serve.yaml). port: HTTP port. prompt: the demo request's text.
    keep_running: leave the endpoint up after the demo request."""

    config: str | None = None
    port: int = 8000
    prompt: str = "Describe the image."
    keep_running: bool = False

    def __post_init__(self):
        self.config = paths.local_path(self.config)


@dataclass
class MlflowSettings:
    """tracking_uri: MLflow store or server (default: $MLFLOW_TRACKING_URI, else sqlite in `out`). experiment."""

    tracking_uri: str | None = None
    experiment: str = "bitllava"

    def __post_init__(self):
        self.tracking_uri = paths.tracking_uri(self.tracking_uri)


@dataclass
class PipelineConfig:
    """One pipeline run.

    name: run name (MLflow parent run, output folder default).
    preset: model preset ("tiny", "1b").
    out: storage root for every step's output (local folder or s3://bucket/prefix).
    seed: seed of the random initial weights and data order.
    vision / llm: pretrained CLIP or SigLIP tower / LM (folder or hub id: OLMo-Bitnet, or a transformers Llama, Qwen2,
        OLMo, OLMo-2 or BitNet LLM, made ternary); null keeps the preset's random weights.
    qk_norm: a fresh OLMo-Bitnet LM with Chameleon's QK-norm (no `llm:`; see OLMoBitNetConfig.qk_norm).
    data: see DataSources.
    preprocess: see PreprocessSettings.
    align / instruct: TrainConfig fields; `config:` names a YAML of them (relative to pipelines/configs/).
    share: TrainConfig fields of a second pre-training stage between align and instruct (TinyLLaVA's share
        recipe: the align data, from the align model, training the LLM and the upper tower too; e.g.
        `config: train/1b-share.yaml`); null: no such stage. It trains on the align store, which must
        then hold pixels where it trains the tower (`preprocess.encode`).
    eval / pack / serve / mlflow: see EvalSettings, PackSettings, ServeSettings, MlflowSettings.
    """

    name: str
    preset: str
    out: str
    seed: int = 0
    vision: str | None = None
    llm: str | None = None
    qk_norm: bool = False
    data: DataSources = field(default_factory=dict)  # a mapping until __post_init__ (which requires sources)
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    align: dict = field(default_factory=dict)
    instruct: dict = field(default_factory=dict)
    share: dict | None = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    pack: PackSettings = field(default_factory=PackSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)

    def __post_init__(self):
        from model.assemble import check_qk_norm
        from model.presets import get_preset

        preset = get_preset(self.preset)
        self.out = paths.local_path(self.out)
        self.vision, self.llm = paths.model_ref(self.vision), paths.model_ref(self.llm)
        if preset.tokenizer is None and self.llm is None:
            raise ValueError(f"preset {self.preset!r} needs llm: (its LM, tokenizer and shapes come from the LLM "
                             "folder or hub id, e.g. microsoft/bitnet-b1.58-2B-4T-bf16)")
        check_qk_norm(self.qk_norm, self.preset, self.llm)
        self.data = from_mapping(DataSources, self.data, "data")
        self.preprocess = from_mapping(PreprocessSettings, self.preprocess, "preprocess")
        self.eval = from_mapping(EvalSettings, self.eval, "eval")
        self.pack = from_mapping(PackSettings, self.pack, "pack")
        self.serve = from_mapping(ServeSettings, self.serve, "serve")
        self.mlflow = from_mapping(MlflowSettings, self.mlflow, "mlflow")
        # the stages' settings must form valid TrainConfigs
        for stage in self.train_stages:
            self.train_config(stage, data="<store>", out="<out>", init="<init>")
        if self.share is not None and self.train_config("share", data="<store>", out="<out>", init="<init>").trains_tower \
                and self.preprocess.encode("align") != "pixels":
            raise ValueError("share: trains the vision tower, so the align store must hold pixels, not cached "
                             "features of the old tower: set preprocess.encode to pixels for align")

    @property
    def train_stages(self) -> list[str]:
        """The training stages in order: align, share (when configured), instruct."""
        return ["align"] + (["share"] if self.share is not None else []) + ["instruct"]

    def train_config(self, stage: str, **locations):
        """The TrainConfig of a stage; `share` trains on the align data (the align phase's template)."""
        from components.train.config import load_train_config

        if stage == "share" and not isinstance(self.share, dict):
            raise ValueError(f"share: must be a mapping of training settings, not {self.share!r}")
        settings = dict(getattr(self, stage))
        path = settings.pop("config", None)
        if path and not os.path.isabs(path):
            path = os.path.join(ROOT, "pipelines", "configs", path)
        phase = "align" if stage == "share" else stage
        if settings.get("phase", phase) != phase:
            raise ValueError(f"{stage}: trains phase {phase!r} data; drop phase: {settings['phase']!r}")
        settings.pop("phase", None)
        return load_train_config(path, phase=phase, seed=self.seed, **settings, **locations)


def load_pipeline_config(path: str, **overrides) -> PipelineConfig:
    """Read `path` (relative to the working directory, else to the repository root) and apply `overrides`."""
    path = paths.config_file(path)
    if not os.path.isfile(path):
        raise ValueError(f"pipeline config {path} does not exist")
    return PipelineConfig(**load_fields(path, PipelineConfig, overrides, "settings"))
