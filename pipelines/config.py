"""The whole pipeline in one YAML: data, preprocessing, both training phases, evaluation, packing, serving.

`load_pipeline_config(path)` reads and validates it; every shipped file in pipelines/configs/ is
loaded by a test. Paths inside the YAML are relative to the repository root (or absolute / s3://).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from components.yaml_fields import load_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_TASKS = ("pope", "vqav2", "textvqa")


@dataclass
class DataSources:
    """Where the raw data comes from.

    synth: generate data with `bitllava data synth` settings ({records, instruct_images, eval, corrupt}); or null.
    cc595k: {json, images} of LLaVA-CC3M-Pretrain-595K (used when synth is null).
    instruct: {json, images} of LLaVA-Instruct-150K (used when synth is null).
    eval: {pope: {annotations: [...], images}, vqav2: {questions, annotations, images}, textvqa: {...}}.
    """

    synth: dict | None = None
    cc595k: dict | None = None
    instruct: dict | None = None
    eval: dict = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """One pipeline run.

    name: run name (MLflow parent run, output folder default).
    preset: model preset ("tiny", "1b").
    out: storage root for every step's output (local folder or s3://bucket/prefix).
    seed: seed of the random initial weights and data order.
    vision / llm: pretrained CLIP tower / OLMo-Bitnet LM (folder or hub id); null keeps random weights.
    data: see DataSources.
    preprocess: {encode_align: pixels|features, encode_instruct: pixels|features, shard_records, max_length}.
    align / instruct: TrainConfig fields; `config:` names a YAML of them (relative to pipelines/configs/).
    eval: {tasks: [...], limit, num_actors, batch_size}.
    pack: {format: 2bit|1.6bit}.
    serve: {config: serve YAML, port, prompt, keep_running}.
    mlflow: {tracking_uri, experiment}.
    """

    name: str
    preset: str
    out: str
    seed: int = 0
    vision: str | None = None
    llm: str | None = None
    data: DataSources = field(default_factory=DataSources)
    preprocess: dict = field(default_factory=dict)
    align: dict = field(default_factory=dict)
    instruct: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    pack: dict = field(default_factory=lambda: {"format": "2bit"})
    serve: dict = field(default_factory=dict)
    mlflow: dict = field(default_factory=dict)

    def __post_init__(self):
        from model.presets import get_preset

        get_preset(self.preset)
        if isinstance(self.data, dict):
            unknown = set(self.data) - {f.name for f in dataclasses.fields(DataSources)}
            if unknown:
                raise ValueError(f"unknown data settings {sorted(unknown)}")
            self.data = DataSources(**self.data)
        if self.data.synth is None and not (self.data.cc595k and self.data.instruct):
            raise ValueError("data needs either `synth` settings or both `cc595k` and `instruct` sources")
        for name in ("cc595k", "instruct"):
            src = getattr(self.data, name)
            if src is not None and set(src) != {"json", "images"}:
                raise ValueError(f"data.{name} needs exactly `json` and `images`, got {sorted(src)}")
        for key in ("encode_align", "encode_instruct"):
            if self.preprocess.get(key, "pixels") not in ("pixels", "features"):
                raise ValueError(f"preprocess.{key} must be pixels or features")
        tasks = self.eval.get("tasks", [])
        bad = [t for t in tasks if t not in EVAL_TASKS]
        if bad:
            raise ValueError(f"unknown eval tasks {bad}; choose from {EVAL_TASKS}")
        if self.pack.get("format", "2bit") not in ("2bit", "1.6bit"):
            raise ValueError("pack.format must be 2bit or 1.6bit")
        # the phase settings must form valid TrainConfigs
        for phase in ("align", "instruct"):
            self.train_config(phase, data="<store>", out="<out>", init="<init>")

    def train_config(self, phase: str, **paths):
        from components.train.config import load_train_config

        settings = dict(getattr(self, phase))
        path = settings.pop("config", None)
        if path and not os.path.isabs(path):
            path = os.path.join(ROOT, "pipelines", "configs", path)
        return load_train_config(path, phase=phase, seed=self.seed, **settings, **paths)


def load_pipeline_config(path: str, **overrides) -> PipelineConfig:
    """Read `path` (relative to the working directory, else to the repository root) and apply `overrides`."""
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)  # a job or kfp task may run from another directory
    if not os.path.isfile(path):
        raise ValueError(f"pipeline config {path} does not exist")
    return PipelineConfig(**load_fields(path, PipelineConfig, overrides, "settings"))
