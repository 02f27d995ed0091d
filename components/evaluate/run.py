"""`bitllava eval run`: batch inference with Ray Data, official result files, scores, MLflow.

Flow: load and check the task's files -> check every image exists -> Ray Data dataset of
(question, image location) rows -> `map_batches` with `AnswerPredictor`, a callable class run by a
fixed actor pool (one model replica per actor, greedy short answers) -> the driver collects answers
as batches finish (progress lines) -> result file in the official format -> scored from that file
-> metrics JSON -> MLflow run (parameters, metrics, the result and metrics files).

A local Ray cluster is started when none is running and no address is given; the model folder and
the image folder must be readable from every Ray worker (a shared path or `s3://`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from components import paths
from components.evaluate.datasets import TASKS, EvalSet, load_eval_set, preview
from components.evaluate.images import decode_image, image_location, is_uri, missing_images, read_bytes
from components.evaluate.inference import answer_batch, load_eval_model, model_location
from components.evaluate.predictions import match_predictions, prediction_filename, read_predictions, write_predictions
from components.evaluate.scoring import flatten_metrics, score
from components.evaluate.tracking import end_run, local_tracking_uri, log_results, start_run


@dataclass
class EvalConfig:
    """One evaluation of one model on one task."""

    task: str
    """Benchmark: "pope", "vqav2" or "textvqa"."""
    model: str
    """Checkpoint folder (or hub id) or packed model folder (`bitllava pack`); must take images."""
    images: str
    """Folder of the task's images, local or `s3://bucket/prefix` (COCO val2014 for POPE and VQAv2,
    TextVQA's `train_images` for its val set)."""
    out_dir: str
    """Output folder: result file, metrics JSON and, by default, the MLflow store."""
    annotations: list[str] = field(default_factory=list)
    """POPE: `coco_pope_<split>.json` files or a folder of them; VQAv2: the annotations file (leave
    out for test-dev: predictions are written, not scored); TextVQA: `TextVQA_0.5.1_val.json`."""
    questions: str | None = None
    """VQAv2 only: `v2_OpenEnded_mscoco_<subtype>_questions.json`."""
    limit: int | None = None
    """Evaluate only the first `limit` questions of each split (None: all)."""
    batch_size: int = 8
    """Questions per generate call in an actor."""
    num_actors: int = 1
    """Model replicas (Ray actors) answering in parallel."""
    cpus_per_actor: int = 1
    """CPUs reserved by each actor; also its torch thread count."""
    max_new_tokens: int = 16
    """Longest answer, in tokens (short answers need few)."""
    ray_address: str | None = None
    """Ray cluster to join ("auto", "ray://host:10001"); None: a Ray already initialised in this process,
    else a fresh local cluster."""
    num_cpus: int | None = None
    """CPUs of the local cluster started here (default: num_actors * cpus_per_actor)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: sqlite store `<out_dir>/mlflow.db`, artifacts in `<out_dir>/mlartifacts`."""
    experiment: str = "bitllava-eval"
    """MLflow experiment (ignored when nested: the parent's experiment is used)."""
    mlflow_parent_run_id: str | None = None
    """Run id of a pipeline run to nest this evaluation under (in the same store)."""
    run_name: str | None = None
    """MLflow run name (default "eval-<task>")."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("model", "images", "out_dir"):
            if not getattr(self, name):
                raise ValueError(f"eval config: {name} is required")
        self.annotations = paths.local_paths(list(self.annotations or []))
        # user paths mean what they mean in the user's shell; the model actors run in other folders
        self.images, self.out_dir, self.questions = (paths.local_path(p) for p in (self.images, self.out_dir,
                                                                                    self.questions))
        self.model = paths.model_ref(self.model)
        self.tracking_uri = paths.tracking_uri(self.tracking_uri)
        for name in ("batch_size", "num_actors", "cpus_per_actor", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eval config: {name} must be a positive integer, got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"eval config: limit must be a positive integer or None, got {self.limit!r}")
        if self.num_cpus is not None:
            if self.ray_address is not None:
                raise ValueError("eval config: num_cpus sizes a local cluster; it cannot be combined with ray_address")
            if self.num_cpus < self.num_actors * self.cpus_per_actor:
                raise ValueError(
                    f"eval config: {self.num_actors} actors x {self.cpus_per_actor} CPUs do not fit in a local "
                    f"cluster of {self.num_cpus} CPUs; raise num_cpus or lower num_actors / cpus_per_actor"
                )
        if self.task == "vqav2" and not self.questions:
            raise ValueError("eval config: VQAv2 needs its questions file (questions / --questions)")
        if self.task != "vqav2" and self.questions:
            raise ValueError(f"eval config: {self.task} files hold the questions; pass them as annotations")
        if not self.annotations and self.task != "vqav2":
            raise ValueError(f"eval config: {self.task} needs its annotation file(s) (annotations / --annotations)")


class AnswerPredictor:
    """Ray Data actor: one model replica answering batches of {index, question, image} rows."""

    def __init__(self, model: str, max_new_tokens: int, torch_threads: int):
        torch.set_num_threads(torch_threads)
        self.loaded = load_eval_model(model)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows whose image cannot be read get an empty answer and an `error` (the driver stops on it)."""
        images, errors = [], []
        for location in (str(loc) for loc in batch["image"]):
            try:
                images.append(decode_image(read_bytes(location), location))
                errors.append("")
            except (OSError, ValueError) as err:
                images.append(None)
                errors.append(str(err) if isinstance(err, ValueError) else f"cannot read image {location}: {err}")
        readable = [i for i, image in enumerate(images) if image is not None]
        answers = [""] * len(images)
        if readable:
            texts = answer_batch(self.loaded, [str(batch["question"][i]) for i in readable],
                                 [images[i] for i in readable], self.max_new_tokens)
            for i, text in zip(readable, texts):
                answers[i] = text
        return {"index": batch["index"], "answer": np.array(answers, dtype=object),
                "error": np.array(errors, dtype=object)}


def _log(message: str) -> None:
    print(f"[eval] {message}", flush=True)


def infer_answers(config: EvalConfig, eval_set: EvalSet) -> dict:
    """Answers by question key, from a Ray Data pipeline over an actor pool."""
    import ray
    import ray.data

    # workers may not share the driver's working directory: hand them absolute paths
    images = config.images if is_uri(config.images) else os.path.abspath(config.images)
    rows = [{"index": i, "question": q.question, "image": image_location(images, q.image)}
            for i, q in enumerate(eval_set.questions)]
    context = ray.data.DataContext.get_current()
    progress_bars = context.enable_progress_bars
    started_here = not ray.is_initialized()
    if started_here:
        if config.ray_address is None:
            # "local": a fresh cluster even when `ray start` left one running on this machine
            num_cpus = config.num_cpus or config.num_actors * config.cpus_per_actor
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        else:
            ray.init(address=config.ray_address)
    try:
        context.enable_progress_bars = False  # the driver prints its own progress lines
        blocks = max(1, min(math.ceil(len(rows) / config.batch_size), 1000))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            AnswerPredictor,
            fn_constructor_kwargs={"model": model_location(config.model), "max_new_tokens": config.max_new_tokens,
                                   "torch_threads": config.cpus_per_actor},
            compute=ray.data.ActorPoolStrategy(size=config.num_actors),
            batch_size=config.batch_size,
            num_cpus=config.cpus_per_actor,
        )
        answers: dict = {}
        start = time.perf_counter()
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            errors = [str(e) for e in batch["error"] if e]
            if errors:
                raise ValueError(f"{len(errors)} image(s) of a batch cannot be read: " + "; ".join(errors[:3]))
            for index, answer in zip(batch["index"], batch["answer"]):
                answers[eval_set.questions[int(index)].key] = str(answer)
            elapsed = time.perf_counter() - start
            _log(f"{eval_set.task}: {len(answers)}/{len(rows)} answered "
                 f"({len(answers) / elapsed:.2f} questions/s, {elapsed:.0f} s)")
    finally:
        context.enable_progress_bars = progress_bars
        if started_here:
            ray.shutdown()
    if len(answers) != len(rows):
        raise RuntimeError(f"the pipeline returned {len(answers)} answers for {len(rows)} questions")
    return answers


def run_eval(config: EvalConfig) -> dict:
    """Evaluate, write the result and metrics files, log to MLflow; returns a summary."""
    model_location(config.model)
    eval_set = load_eval_set(config.task, config.annotations, config.questions).limited(config.limit)
    no_text = [q.question_id for q in eval_set.questions if not q.question]
    if no_text:
        raise ValueError(f"{len(no_text)} question(s) have no text ({preview(no_text)}); pass the questions file")
    missing = missing_images(config.images, [q.image for q in eval_set.questions])
    if missing:
        raise ValueError(f"{len(missing)} image(s) are missing from {config.images}: {preview(missing)}")
    os.makedirs(config.out_dir, exist_ok=True)
    splits = ", ".join(eval_set.splits)
    _log(f"{config.task}: {len(eval_set.questions)} questions ({splits}) from {preview(eval_set.sources, 3)}; "
         f"model {config.model}; {config.num_actors} actor(s) x batch {config.batch_size}")

    tracking_uri = config.tracking_uri or local_tracking_uri(config.out_dir)
    artifact_root = None if config.tracking_uri else os.path.join(config.out_dir, "mlartifacts")
    run = start_run(tracking_uri, config.experiment, config.run_name or f"eval-{config.task}",
                    config.mlflow_parent_run_id, artifact_root)
    _log(f"MLflow run {run.run_id} in {tracking_uri}")
    ok = False
    try:
        start = time.perf_counter()
        answers = infer_answers(config, eval_set)
        seconds = time.perf_counter() - start
        predictions_path = os.path.join(config.out_dir, prediction_filename(config.task))
        write_predictions(predictions_path, eval_set, answers)
        metrics = None
        if eval_set.has_ground_truth:
            # scored from the file just written: what is logged is what `eval score` gives for it
            matched = match_predictions(eval_set, read_predictions(config.task, predictions_path))
            metrics = score(eval_set, matched)
        else:
            _log("the files hold no answers (a test split): predictions written for submission, not scored")
        summary = {
            "task": config.task,
            "model": config.model,
            "num_questions": len(eval_set.questions),
            "seconds": round(seconds, 2),
            "questions_per_second": round(len(eval_set.questions) / seconds, 3),
            "predictions": predictions_path,
            "metrics": metrics,
            "mlflow": run.as_dict(),
        }
        metrics_path = os.path.join(config.out_dir, f"{config.task}_metrics.json")
        with open(metrics_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        summary["metrics_file"] = metrics_path
        logged = flatten_metrics(metrics or {}, prefix=f"{config.task}/")
        logged.update({f"{config.task}/eval_seconds": seconds,
                       f"{config.task}/questions_per_second": len(eval_set.questions) / seconds})
        params = {k: v for k, v in asdict(config).items() if v is not None and k not in ("tracking_uri",)}
        params["num_questions"] = len(eval_set.questions)
        log_results(run, params, logged, {predictions_path: "eval", metrics_path: "eval"})
        ok = True
    finally:
        end_run(run, ok)
    _log(f"wrote {predictions_path} and {metrics_path}")
    return summary
