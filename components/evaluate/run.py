"""`bitllava eval run`: batch inference with Ray Data, official result files, scores, MLflow.

Any task of `components.evaluate.tasks` runs the same way; `run_evals` answers several tasks in one
pass (one actor pool, the model loaded once per replica) and then treats each as `run_eval` would.

Flow: load and check the task's files -> check every image exists -> Ray Data dataset of (prompt,
image location or embedded image) rows -> `map_batches` with `AnswerPredictor`, a callable class run
by a fixed actor pool (one model replica per actor, greedy decoding) -> the driver collects answers
as batches finish (progress lines) -> result file in the official format -> scored from that file
-> the task's extra outputs (VQAv2 test-dev: the EvalAI submission) -> metrics JSON -> MLflow run
(parameters, metrics, the result, extra and metrics files).

A local Ray cluster is started when none is running and no address is given; the model folder and
the image folder must be readable from every Ray worker (a shared path or `s3://`).
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from components import paths
from components.evaluate.datasets import EvalFiles, EvalSet, load_eval_set, preview
from components.evaluate.images import decode_image, image_location, is_uri, missing_images, read_bytes
from components.evaluate.inference import answer_prompts, load_eval_model, model_location
from components.evaluate.predictions import match_predictions, read_predictions
from components.evaluate.scoring import flatten_metrics, score
from components.evaluate.tasks import get_task
from components.evaluate.tracking import end_run, local_tracking_uri, log_results, start_run
from model.precision import DTYPES


@dataclass
class EvalConfig:
    """One evaluation of one model on one task."""

    task: str
    """Benchmark: one of `components.evaluate.tasks.TASK_NAMES` (pope, vqav2, textvqa, gqa, scienceqa, mme, seed,
    mmbench)."""
    model: str
    """Checkpoint folder (or hub id) or packed model folder (`bitllava pack`); must take images."""
    out_dir: str
    """Output folder: result file, metrics JSON and, by default, the MLflow store."""
    images: str | None = None
    """Folder of the task's images, local or `s3://bucket/prefix` (COCO val2014 for POPE and VQAv2 val,
    TextVQA's `train_images`, GQA's `images`, ScienceQA's `images/test`, `SEED-Bench-image`); MME: its release
    folder (default: the annotations folder); MMBench: none (the TSV embeds its images)."""
    annotations: list[str] = field(default_factory=list)
    """The files holding the ground truth, as the task names them (`bitllava eval run --help`): POPE's
    `coco_pope_<split>.json` files or their folder; VQAv2's annotations (leave out for test-dev); TextVQA's
    `TextVQA_0.5.1_val.json`; GQA's `testdev_balanced_questions.json`; ScienceQA's data folder; MME's release
    folder; `SEED-Bench.json`; MMBench's TSV."""
    questions: str | None = None
    """Question file: VQAv2 `v2_OpenEnded_mscoco_<subtype>_questions.json` or LLaVA's
    `llava_vqav2_mscoco_test-dev2015.jsonl`; LLaVA's question lines for POPE (`llava_pope_test.jsonl`),
    TextVQA (`llava_textvqa_val_v051_ocr.jsonl`) and GQA (`llava_gqa_testdev_balanced.jsonl`)."""
    ocr: str | None = None
    """TextVQA: `TextVQA_Rosetta_OCR_v0.2_val.json`, the OCR tokens of LLaVA-1.5's prompt."""
    test_questions: str | None = None
    """VQAv2 test-dev: the full test2015 question list, so that the EvalAI submission names every id."""
    protocol: str | None = None
    """Prompt protocol of tasks that have several (TextVQA: "ocr", the default, or "no-ocr")."""
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
    dtype: str = "auto"
    """Float type of the model's non-ternary parts: "auto" (bf16 on a GPU or a CPU with native bf16, else
    float32: `model.precision`), "float32" or "bfloat16"."""
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
        spec = get_task(self.task)
        for name in ("model", "out_dir"):
            if not getattr(self, name):
                raise ValueError(f"eval config: {name} is required")
        self.annotations = paths.local_paths(list(self.annotations or []))
        # user paths mean what they mean in the user's shell; the model actors run in other folders
        self.images, self.out_dir, self.questions, self.ocr, self.test_questions = (
            paths.local_path(p) for p in (self.images, self.out_dir, self.questions, self.ocr, self.test_questions))
        self.model = paths.model_ref(self.model)
        self.tracking_uri = paths.tracking_uri(self.tracking_uri)
        if self.dtype not in DTYPES:
            raise ValueError(f"eval config: dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
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
        try:
            spec.check_files(self.files)
        except ValueError as err:
            raise ValueError(f"eval config: {err}") from None
        if self.task == "vqav2" and not self.questions:
            raise ValueError("eval config: VQAv2 needs its questions file (questions / --questions): the annotations "
                             "hold no question text")
        if spec.embeds_images:
            if self.images:
                raise ValueError(f"eval config: {self.task} files embed their images; leave out images / --images")
        elif not self.images:
            if not (spec.images_from_annotations and self.annotations):
                raise ValueError(f"eval config: images is required ({self.task}: {spec.images})")
            self.images = self.annotations[0]

    @property
    def files(self) -> EvalFiles:
        return EvalFiles(tuple(self.annotations), self.questions, self.ocr, self.test_questions, self.protocol)


class AnswerPredictor:
    """Ray Data actor: one model replica answering batches of {index, prompt, image, image_data} rows."""

    def __init__(self, model: str, max_new_tokens: int, torch_threads: int, dtype: str = "auto"):
        torch.set_num_threads(torch_threads)
        self.loaded = load_eval_model(model, dtype)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows whose image cannot be read get an empty answer and an `error` (the driver stops on it).
        `image_data` (optional): a base64 image used instead of reading `image`."""
        images, errors = [], []
        embedded = batch.get("image_data")
        for i, location in enumerate(str(loc) for loc in batch["image"]):
            data = str(embedded[i]) if embedded is not None and embedded[i] else ""
            try:
                raw = base64.b64decode(data, validate=True) if data else read_bytes(location)
                images.append(decode_image(raw, location))
                errors.append("")
            except (OSError, ValueError) as err:
                images.append(None)
                errors.append(str(err) if isinstance(err, ValueError) else f"cannot read image {location}: {err}")
        readable = [i for i, image in enumerate(images) if image is not None]
        answers = [""] * len(images)
        if readable:
            texts = answer_prompts(self.loaded, [str(batch["prompt"][i]) for i in readable],
                                   [images[i] for i in readable], self.max_new_tokens)
            for i, text in zip(readable, texts):
                answers[i] = text
        return {"index": batch["index"], "answer": np.array(answers, dtype=object),
                "error": np.array(errors, dtype=object)}


def _log(message: str) -> None:
    print(f"[eval] {message}", flush=True)


SHARED = ("model", "batch_size", "num_actors", "cpus_per_actor", "max_new_tokens", "dtype", "ray_address", "num_cpus")


def infer_answers(config: EvalConfig, eval_sets: list[EvalSet], images: list[str | None] | None = None) -> list[dict]:
    """Answers by question key, one dict per set, from one Ray Data pipeline over one actor pool (several sets
    share its model replicas). `images`: each set's image folder (default: the config's)."""
    import ray
    import ray.data

    rows, owners = [], []
    for n, eval_set in enumerate(eval_sets):
        folder = (images or [config.images] * len(eval_sets))[n]
        # workers may not share the driver's working directory: hand them absolute paths
        folder = folder and (folder if is_uri(folder) else os.path.abspath(folder))
        for q in eval_set.questions:
            rows.append({"index": len(rows), "prompt": q.prompt, "image_data": q.image_data or "",
                         "image": image_location(folder, q.image) if q.image_data is None
                         else f"{eval_set.task}:{q.question_id}"})
            owners.append((n, q.key))
    names = "+".join(s.task for s in eval_sets)
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
    answers: list[dict] = [{} for _ in eval_sets]
    try:
        context.enable_progress_bars = False  # the driver prints its own progress lines
        blocks = max(1, min(math.ceil(len(rows) / config.batch_size), 1000))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            AnswerPredictor,
            fn_constructor_kwargs={"model": model_location(config.model), "max_new_tokens": config.max_new_tokens,
                                   "torch_threads": config.cpus_per_actor, "dtype": config.dtype},
            compute=ray.data.ActorPoolStrategy(size=config.num_actors),
            batch_size=config.batch_size,
            num_cpus=config.cpus_per_actor,
        )
        done = 0
        start = time.perf_counter()
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            errors = [str(e) for e in batch["error"] if e]
            if errors:
                raise ValueError(f"{len(errors)} image(s) of a batch cannot be read: " + "; ".join(errors[:3]))
            for index, answer in zip(batch["index"], batch["answer"]):
                n, key = owners[int(index)]
                answers[n][key] = str(answer)
                done += 1
            elapsed = time.perf_counter() - start
            _log(f"{names}: {done}/{len(rows)} answered ({done / elapsed:.2f} questions/s, {elapsed:.0f} s)")
    finally:
        context.enable_progress_bars = progress_bars
        if started_here:
            ray.shutdown()
    got = sum(len(a) for a in answers)
    if got != len(rows):
        raise RuntimeError(f"the pipeline returned {got} answers for {len(rows)} questions")
    return answers


def prepare(config: EvalConfig) -> EvalSet:
    """The checked set of one config: files, question text, images; nothing started yet."""
    model_location(config.model)
    eval_set = load_eval_set(config.task, config.annotations, config.questions, ocr=config.ocr,
                             test_questions=config.test_questions, protocol=config.protocol,
                             for_run=True).limited(config.limit)
    no_text = [q.question_id for q in eval_set.questions if not q.prompt]
    if no_text:
        raise ValueError(f"{len(no_text)} question(s) have no text ({preview(no_text)}); pass the questions file")
    on_disk = [q.image for q in eval_set.questions if q.image_data is None]
    missing = missing_images(config.images, on_disk) if on_disk else []
    if missing:
        raise ValueError(f"{len(missing)} image(s) are missing from {config.images}: {preview(missing)}")
    return eval_set


def run_eval(config: EvalConfig) -> dict:
    """Evaluate, write the result and metrics files, log to MLflow; returns a summary."""
    return run_evals([config])[0]


def run_evals(configs: list[EvalConfig]) -> list[dict]:
    """Several tasks in one Ray Data pass (one actor pool, the model loaded once per replica); then, per task,
    the result file, extra outputs, scores, metrics JSON and its own MLflow run. The configs must agree on
    the model and the inference settings (`SHARED`)."""
    if not configs:
        raise ValueError("run_evals needs at least one eval config")
    first = configs[0]
    for config in configs[1:]:
        differ = [k for k in SHARED if getattr(config, k) != getattr(first, k)]
        if differ:
            raise ValueError(f"tasks evaluated in one pass must share {', '.join(differ)}: {first.task} and "
                             f"{config.task} differ")
    eval_sets = [prepare(config) for config in configs]
    runs = []
    for config, eval_set in zip(configs, eval_sets):
        os.makedirs(config.out_dir, exist_ok=True)
        protocol = f", protocol {eval_set.protocol}" if eval_set.protocol else ""
        _log(f"{config.task}: {len(eval_set.questions)} questions ({', '.join(eval_set.splits)}{protocol}) from "
             f"{preview(eval_set.sources, 3)}; model {config.model}; {config.num_actors} actor(s) x batch "
             f"{config.batch_size}")
        tracking_uri = config.tracking_uri or local_tracking_uri(config.out_dir)
        artifact_root = None if config.tracking_uri else os.path.join(config.out_dir, "mlartifacts")
        runs.append(start_run(tracking_uri, config.experiment, config.run_name or f"eval-{config.task}",
                              config.mlflow_parent_run_id, artifact_root))
        runs[-1].out_dir = config.out_dir
        _log(f"MLflow run {runs[-1].run_id} in {tracking_uri}")
    finished: list[bool] = [False] * len(configs)
    summaries = []
    try:
        start = time.perf_counter()
        all_answers = infer_answers(first, eval_sets, [c.images for c in configs])
        seconds = time.perf_counter() - start
        total = sum(len(s.questions) for s in eval_sets)
        for n, (config, eval_set, answers, run) in enumerate(zip(configs, eval_sets, all_answers, runs)):
            together = [c.task for c in configs if c is not config]
            summaries.append(finish(config, eval_set, answers, run, seconds, total, together))
            finished[n] = True
    finally:
        for run, ok in zip(runs, finished):
            end_run(run, ok)
    return summaries


def finish(config: EvalConfig, eval_set: EvalSet, answers: dict, run, seconds: float, total: int,
           together: list[str]) -> dict:
    """Result file, extra outputs, scores (from the file written), metrics JSON, MLflow logging, for one task.
    `seconds` / `total`: the inference pass and all the questions it answered (shared with `together`)."""
    spec = get_task(config.task)
    predictions_path = os.path.join(config.out_dir, spec.prediction_file)
    if os.path.isdir(predictions_path):  # a result folder (MME): no stale subtask files from an older run
        shutil.rmtree(predictions_path)
    spec.write(predictions_path, eval_set, answers)
    extra = spec.extra_outputs(config.out_dir, eval_set, answers, config.files)
    metrics = None
    if eval_set.has_ground_truth:
        # scored from the file just written: what is logged is what `eval score` gives for it
        matched = match_predictions(eval_set, read_predictions(config.task, predictions_path))
        metrics = score(eval_set, matched)
    else:
        _log(f"{config.task}: the files hold no answers (a test split): predictions written for submission, "
             f"not scored")
    summary = {
        "task": config.task,
        "model": config.model,
        "num_questions": len(eval_set.questions),
        "protocol": eval_set.protocol,
        "seconds": round(seconds, 2),
        "questions_per_second": round(total / seconds, 3),
        **({"evaluated_with": together} if together else {}),
        "predictions": predictions_path,
        **extra,
        "metrics": metrics,
        "notes": eval_set.notes,
        "mlflow": run.as_dict(),
    }
    metrics_path = os.path.join(config.out_dir, f"{config.task}_metrics.json")
    with open(metrics_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    summary["metrics_file"] = metrics_path
    logged = flatten_metrics(metrics or {}, prefix=f"{config.task}/")
    logged.update({f"{config.task}/eval_seconds": seconds, f"{config.task}/questions_per_second": total / seconds})
    params = {k: v for k, v in asdict(config).items() if v is not None and k not in ("tracking_uri",)}
    params["num_questions"] = len(eval_set.questions)
    if eval_set.protocol:
        params["protocol"] = eval_set.protocol
    if together:
        params["evaluated_with"] = ",".join(together)
    artifacts = {path: "eval" for path in (predictions_path, *extra.values(), metrics_path)}
    log_results(run, params, logged, artifacts)
    _log(f"wrote {predictions_path} and {metrics_path}")
    return summary
