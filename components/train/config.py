"""Training configuration: one dataclass, validated, mirrored by YAML files in pipelines/configs/.

Defaults per phase follow LLaVA-1.5 as used by LLaVaOLMoBitNet1B (DESIGN.md section 5):
align (projector only): lr 1e-3, batch 32 x accumulation 4, weight decay 0;
instruct (projector + LLM): lr 2e-5, batch 8 x accumulation 2, Adam betas (0.9, 0.98);
both one epoch, cosine schedule, warmup ratio 0.03.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from components import paths
from components.yaml_fields import load_fields


PHASES = ("align", "instruct")
TUNE_CHOICES = {"tune_projector": ("full", "frozen"), "tune_llm": ("full", "frozen"),
                "tune_vision": ("frozen", "full", "partial")}
PHASE_TUNING = {"align": "frozen", "instruct": "full"}  # the LLM's, as LLaVA-1.5 trains it

PHASE_DEFAULTS = {
    "align": dict(lr=1e-3, per_device_batch=32, grad_accum=4, weight_decay=0.0, adam_betas=(0.9, 0.999)),
    "instruct": dict(lr=2e-5, per_device_batch=8, grad_accum=2, weight_decay=0.0, adam_betas=(0.9, 0.98)),
}


@dataclass
class TrainConfig:
    """One training phase.

    phase: the data's template and the defaults: "align" (LLaVA-1.5: the projector only), "instruct" (the
        projector and the BitLinear LLM).
    tune_projector / tune_llm / tune_vision: what the phase trains, per module, as TinyLLaVA Factory's recipes
        set it: "full" or "frozen" (tune_llm's default follows the phase), and for the tower also "partial":
        its encoder layers from `tune_vision_from_layer` up to the feature layer (the layers after
        `vision_feature_layer` never reach the features). A trained tower needs a pixels store (cached
        features of the old tower would be stale).
    tune_vision_from_layer: the first trained tower layer of tune_vision "partial" (TinyLLaVA's share recipe: 12
        of CLIP ViT-L's 24).
    projector_lr / vision_lr: learning rates of those parameter groups (None: lr), as TinyLLaVA's
        mm_projector_lr / vision_tower_lr.
    data: sample store URI (`bitllava data preprocess` output), local or s3://.
    out: run folder/URI: Ray Train checkpoints, the final model (`<out>/model`), the MLflow store by default.
    init: model folder to start from (`bitllava model init` output for align, the align run's model for instruct).
    workers: Ray Train workers (one per GPU, or CPU processes).
    cpus_per_worker: CPUs each worker reserves (keep some free for Ray Data's streaming reads).
    use_gpu: one GPU per worker; bf16 then, fp32 on CPU.
    zero_stage: DeepSpeed ZeRO stage, 2 or 3.
    epochs: passes over the data.
    max_steps: stop after this many optimizer steps (None: the epochs decide).
    per_device_batch: samples per worker per micro-step.
    grad_accum: micro-steps per optimizer step.
    lr: peak learning rate.
    warmup_ratio: fraction of the optimizer steps spent warming up linearly.
    weight_decay: AdamW weight decay.
    adam_betas: AdamW betas.
    max_grad_norm: gradient clipping (0 disables).
    max_consecutive_skips: an optimizer step whose loss or gradient norm is not finite (inf/NaN, e.g. from a
        corrupt sample) is skipped: no update, counted in MLflow as `skipped_steps` and logged with the
        batch's sample ids. More than this many skipped steps in a row stop the run with an error, keeping
        the last checkpoint (0: the first one stops it).
    z_loss: coefficient c of Chameleon's z-loss, c * logsumexp(logits)^2 averaged over label tokens, added to
        the loss for output-layer stability (0: off; Chameleon 1e-5, PaLM 1e-4); logged as `z_loss`, unscaled.
    checkpoint_every: optimizer steps between checkpoints (a final one is always written).
    seed: model-independent randomness (data order).
    gradient_checkpointing: recompute block activations in the backward pass.
    group_by_length: sort shuffled samples by length within megabatches of `workers` batches (LLaVA's
        length-grouped sampler), so a batch needs little padding and stays a random draw.
    max_failures: worker failures Ray Train recovers from (restarting from the last checkpoint).
    experiment: MLflow experiment.
    run_name: MLflow run name (default: the phase).
    parent_run_id: nest this phase's MLflow run under that run.
    tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in `out`).
    peak_tflops: accelerator peak for MFU (default: known GPUs; none on CPU).
    """

    phase: str
    data: str
    out: str
    init: str
    workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    zero_stage: int = 2
    epochs: int = 1
    max_steps: int | None = None
    per_device_batch: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    warmup_ratio: float = 0.03
    weight_decay: float | None = None
    adam_betas: tuple[float, float] | None = None
    max_grad_norm: float = 1.0
    max_consecutive_skips: int = 10
    z_loss: float = 0.0
    checkpoint_every: int = 50
    seed: int = 0
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    max_failures: int = 2
    experiment: str = "bitllava"
    run_name: str | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    peak_tflops: float | None = None
    tune_projector: str = "full"
    tune_llm: str | None = None
    tune_vision: str = "frozen"
    tune_vision_from_layer: int | None = None
    projector_lr: float | None = None
    vision_lr: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; choose one of {PHASES}")
        if self.tune_llm is None:
            self.tune_llm = PHASE_TUNING[self.phase]
        self._check_tuning()
        for key, value in PHASE_DEFAULTS[self.phase].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, not {self.zero_stage}")
        for name in ("workers", "epochs", "per_device_batch", "grad_accum", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.max_failures < 0:
            raise ValueError("max_failures must be >= 0")
        self.z_loss = float(self.z_loss)  # YAML reads 1e-5 (no dot) as a string
        if not 0 <= self.z_loss < 1:
            raise ValueError(f"z_loss is a small coefficient in [0, 1) (Chameleon 1e-5), got {self.z_loss}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")

    def _check_tuning(self) -> None:
        for name, choices in TUNE_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, not {getattr(self, name)!r}")
        if (self.tune_vision == "partial") != (self.tune_vision_from_layer is not None):
            raise ValueError("tune_vision: partial needs tune_vision_from_layer (the first trained tower layer), "
                             "and tune_vision_from_layer is only for tune_vision: partial")
        if self.tune_vision_from_layer is not None and self.tune_vision_from_layer < 0:
            raise ValueError(f"tune_vision_from_layer must be >= 0, got {self.tune_vision_from_layer}")
        if "full" not in (self.tune_projector, self.tune_llm) and self.tune_vision == "frozen":
            raise ValueError("every module is frozen: set tune_projector, tune_llm or tune_vision")
        for name in ("projector_lr", "vision_lr"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))  # YAML reads 1e-4 (no dot) as a string
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def trains_tower(self) -> bool:
        return self.tune_vision != "frozen"

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.grad_accum * self.workers

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


def load_train_config(path: str | None = None, **overrides) -> TrainConfig:
    """A YAML file's fields, then non-None overrides (command-line flags). Local paths (data, out, init,
    tracking_uri) are made absolute here, relative to the working directory: Train workers run elsewhere."""
    if path:
        path = paths.config_file(path)
        if not os.path.isfile(path):
            raise ValueError(f"training config {path} does not exist")
    values = load_fields(path, TrainConfig, overrides, "training settings")
    missing = [k for k in ("phase", "data", "out", "init") if k not in values]
    if missing:
        raise ValueError(f"missing training settings {missing} (give them in the YAML or as flags)")
    for key in ("data", "out", "init"):
        values[key] = paths.local_path(values[key])
    values["tracking_uri"] = paths.tracking_uri(values.get("tracking_uri"))
    return TrainConfig(**values)
