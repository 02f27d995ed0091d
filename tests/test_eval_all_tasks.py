"""End to end: the tiny pipeline's evaluation of every task. `data synth` writes the sets in their published
layouts, the pipeline maps them to eval files (`pipelines.run.eval_sources`), and one Ray Data pass over a
real local Ray cluster answers all of them with a tiny model (one actor pool, `run_evals`); each task then
gets its official result file, its scores (equal to `eval score` on that file) and its own MLflow run
nested under a pipeline run. Every answer is checked against the single-sample chat path on the task's
prompt, so the prompts that reached the model are the protocol's."""

import base64
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from components.data.synth import SynthConfig, synthesize
from components.evaluate.answer_processing import normalize_answer
from components.evaluate.datasets import load_eval_set
from components.evaluate.run import EvalConfig, run_evals
from components.evaluate.scoring import flatten_metrics, score_files
from components.evaluate.tasks import TASK_NAMES
from model.chat import generate_reply
from model.checkpoint import load_model, save_model
from model.presets import build_from_preset
from pipelines.config import load_pipeline_config
from pipelines.demo import DEMO_CONFIG
from pipelines.run import eval_sources

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")
MAX_NEW_TOKENS = 6


def _files(src):
    return dict(annotations=list(src.get("annotations", [])), questions=src.get("questions"), ocr=src.get("ocr"),
                test_questions=src.get("test_questions"), protocol=src.get("protocol"))


def _image(eval_set_question, images):
    if eval_set_question.image_data:
        return Image.open(io.BytesIO(base64.b64decode(eval_set_question.image_data))).convert("RGB")
    with Image.open(os.path.join(images, eval_set_question.image)) as img:
        return img.convert("RGB")


@pytest.mark.slow
def test_tiny_pipeline_evaluates_every_task(tmp_path):
    from mlflow import MlflowClient

    synth = synthesize(SynthConfig(out=str(tmp_path / "synth"), records=4, instruct_images=2, eval=6))
    cfg = load_pipeline_config(DEMO_CONFIG, out=str(tmp_path / "pipeline"))
    sources = eval_sources(cfg, synth)
    assert set(TASK_NAMES) <= set(sources)
    sources["vqav2-test-dev"] = synth["eval"]["vqav2-test-dev"]
    model_dir = str(tmp_path / "tiny-model")
    save_model(model_dir, *build_from_preset("tiny", seed=0))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("pipeline", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment_id, run_name="tiny").info.run_id
    names = list(TASK_NAMES) + ["vqav2-test-dev"]
    configs = [EvalConfig(task=name.split("-")[0], model=model_dir, images=sources[name].get("images"),
                          out_dir=str(tmp_path / "eval" / name), batch_size=8, num_cpus=2,
                          max_new_tokens=MAX_NEW_TOKENS, dtype="float32", tracking_uri=uri, mlflow_parent_run_id=parent,
                          run_name=f"eval-{name}", **_files(sources[name])) for name in names]
    summaries = dict(zip(names, run_evals(configs)))

    loaded = load_model(model_dir)
    for name, config in zip(names, configs):
        summary = summaries[name]
        files = _files(sources[name])
        eval_set = load_eval_set(config.task, for_run=True, **files)
        # the official result format, in question order, holding the chat path's answers to the task's prompts
        expected = [generate_reply(loaded, q.prompt, [_image(q, config.images)], max_new_tokens=MAX_NEW_TOKENS).text
                    for q in eval_set.questions]
        path = summary["predictions"]
        assert os.path.basename(path) == {"pope": "pope_predictions.jsonl", "vqav2": "vqav2_predictions.json",
                                          "textvqa": "textvqa_predictions.json",
                                          "gqa": "testdev_balanced_predictions.json",
                                          "scienceqa": "scienceqa_answers.jsonl", "mme": "mme_results",
                                          "seed": "seed_predictions.jsonl",
                                          "mmbench": "mmbench_answers.jsonl"}[config.task]
        if config.task == "mme":
            written = [line.split("\t")[3] for split in eval_set.splits
                       for line in open(os.path.join(path, f"{split}.txt")).read().splitlines()]
        elif path.endswith(".jsonl"):
            records = [json.loads(line) for line in open(path)]
            key = "prediction" if config.task == "seed" else "text"
            assert [r["question_id"] for r in records] == [q.question_id for q in eval_set.questions]
            written = [r[key] for r in records]
        else:
            records = json.load(open(path))
            key = ("questionId", "prediction") if config.task == "gqa" else ("question_id", "answer")
            assert [r[key[0]] for r in records] == [q.question_id for q in eval_set.questions]
            written = [r[key[1]] for r in records]
        if config.task == "gqa":  # convert_gqa_for_eval.py's normalisation
            expected = [e.rstrip(".").lower() for e in expected]
        if config.task == "mme":  # one line per response
            expected = [" ".join(e.replace("\t", " ").splitlines()) for e in expected]
        assert written == expected, name

        run = client.get_run(summary["mlflow"]["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.run_name == f"eval-{name}" and len(run.data.params["evaluated_with"].split(",")) == 8
        if name == "vqav2-test-dev":
            assert summary["metrics"] is None
            submission = json.load(open(summary["submission"]))
            every_id = [json.loads(line)["question_id"] for line in open(files["test_questions"])]
            assert [s["question_id"] for s in submission] == every_id and len(every_id) > len(eval_set.questions)
            by_id = {q.question_id: e for q, e in zip(eval_set.questions, expected)}
            assert [s["answer"] for s in submission] == [normalize_answer(by_id[i]) if i in by_id else ""
                                                         for i in every_id]
            continue
        metrics = summary["metrics"]
        rescored = score_files(config.task, path, files["annotations"], files["questions"],
                               ocr=files["ocr"], protocol=eval_set.protocol)
        assert rescored == metrics, name  # `eval score` on the written file gives what was logged
        logged = {k: v for k, v in run.data.metrics.items() if not k.endswith(("eval_seconds", "questions_per_second"))}
        assert logged == pytest.approx(flatten_metrics(metrics, prefix=f"{config.task}/")), name
        assert json.load(open(summary["metrics_file"]))["metrics"] == metrics

    assert summaries["textvqa"]["metrics"]["protocol"] == "llava-1.5-ocr"
    assert "no GPT matcher" in summaries["mmbench"]["metrics"]["matcher"]
    mme = summaries["mme"]["metrics"]
    assert mme["perception_subtasks"] == 4 and mme["cognition_max"] == 200
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"eval-{n}" for n in names)

    # the command line scores the MME result folder the same way
    proc = subprocess.run([BIN, "eval", "score", "--task", "mme", "--predictions", summaries["mme"]["predictions"],
                           "--annotations", *sources["mme"]["annotations"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == summaries["mme"]["metrics"]
