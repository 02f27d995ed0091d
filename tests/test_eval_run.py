"""End to end: `bitllava eval run` on generated POPE / VQAv2 / TextVQA sets with a tiny model, on a
real local Ray cluster, logging to real MLflow stores (one default store, one pipeline store with a
parent run)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from components.evaluate.prompts import ocr_prompt, short_answer_prompt
from components.evaluate.scoring import flatten_metrics
from components.evaluate.synthetic_sets import write_pope, write_textvqa, write_textvqa_ocr, write_vqav2
from components.evaluate.inference import load_eval_model
from model.chat import generate_reply
from model.checkpoint import save_model
from model.presets import build_from_preset

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")
MAX_NEW_TOKENS = 8


def _bitllava(*args):
    proc = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"bitllava {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _pope_by_hand(lines, labels):
    """eval_pope.py, restated: first sentence, commas dropped, "no" if a word is No/not/no."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for line in lines:
        text = line["text"].split(".")[0].replace(",", "")
        said = "no" if {"No", "not", "no"} & set(text.split(" ")) else "yes"
        label = labels[(line["category"], line["question_id"])]
        counts[("t" if said == label else "f") + ("p" if said == "yes" else "n")] += 1
    return counts


def _reference_answers(model_dir, prompts, images_dir):
    """The single-sample chat path, (prompt, image) by (prompt, image), in the dtypes `eval run` uses by default
    (dtype auto: the tower in bf16 where the CPU has native bf16)."""
    loaded = load_eval_model(model_dir, "auto")
    answers = []
    for prompt, image_name in prompts:
        with Image.open(os.path.join(images_dir, image_name)) as img:
            image = img.convert("RGB")
        answers.append(generate_reply(loaded, prompt, [image], max_new_tokens=MAX_NEW_TOKENS).text)
    return answers


def _check_mlflow_run(tracking_uri, summary, metrics, predictions_path, parent_run_id):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    task = summary["task"]
    assert run.info.status == "FINISHED" and run.info.run_name == f"eval-{task}"
    logged = {k: v for k, v in run.data.metrics.items() if not k.endswith(("eval_seconds", "questions_per_second"))}
    assert logged == pytest.approx(flatten_metrics(metrics, prefix=f"{task}/"))
    assert run.data.params["task"] == task and int(run.data.params["num_questions"]) == summary["num_questions"]
    assert run.data.tags.get("mlflow.parentRunId") == parent_run_id
    local = client.download_artifacts(run.info.run_id, f"eval/{os.path.basename(predictions_path)}")
    assert open(local).read() == open(predictions_path).read()
    return run


@pytest.mark.slow
def test_eval_run_end_to_end(tmp_path):
    from mlflow import MlflowClient

    model_dir = str(tmp_path / "tiny-model")
    save_model(model_dir, *build_from_preset("tiny", seed=0))
    pope = write_pope(str(tmp_path / "pope"), per_split=6, seed=1)
    vqav2 = write_vqav2(str(tmp_path / "vqav2"), num_questions=9, seed=2)
    textvqa = write_textvqa(str(tmp_path / "textvqa"), num_questions=6, seed=3)
    ocr = write_textvqa_ocr(str(tmp_path / "textvqa"), textvqa)["ocr"]

    # a pipeline run in its own store, to nest the VQA evaluations under
    pipeline_uri = f"sqlite:///{tmp_path / 'pipeline' / 'mlflow.db'}"
    os.makedirs(tmp_path / "pipeline")
    client = MlflowClient(tracking_uri=pipeline_uri)
    experiment_id = client.create_experiment("pipeline", artifact_location=(tmp_path / "pipeline" / "art").as_uri())
    parent_id = client.create_run(experiment_id, run_name="pipeline").info.run_id

    # --- POPE: three splits, two actors, the default MLflow store in the output folder
    out = tmp_path / "out-pope"
    proc = _bitllava("eval", "run", "--task", "pope", "--model", model_dir, "--annotations", *pope["annotations"],
                     "--images", pope["images"], "--out", str(out), "--num-actors", "2", "--batch-size", "4",
                     "--num-cpus", "2", "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert "[eval] pope: 18/18 answered" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in open(summary["predictions"])]
    questions = [json.loads(line) | {"category": split} for path, split in
                 zip(pope["annotations"], ("random", "popular", "adversarial")) for line in open(path)]
    assert [(q["category"], q["question_id"]) for q in questions] == [(x["category"], x["question_id"]) for x in lines]
    assert all(set(x) == {"question_id", "question", "text", "category"} for x in lines)
    expected = _reference_answers(model_dir, [(short_answer_prompt(q["text"]), q["image"]) for q in questions],
                                  pope["images"])
    assert [x["text"] for x in lines] == expected
    metrics = summary["metrics"]
    assert metrics == json.load(open(out / "pope_metrics.json"))["metrics"]
    by_hand = _pope_by_hand(lines, {(q["category"], q["question_id"]): q["label"] for q in questions})
    counted = {k: sum(s[k] for s in metrics["splits"].values()) for k in by_hand}
    assert counted == by_hand
    split = metrics["splits"]["random"]
    assert split["accuracy"] == pytest.approx(100 * (split["tp"] + split["tn"]) / 6)
    assert split["yes_ratio"] == pytest.approx(100 * (split["tp"] + split["fp"]) / 6)
    scored = json.loads(_bitllava("eval", "score", "--task", "pope", "--predictions", summary["predictions"],
                                  "--annotations", os.path.dirname(pope["annotations"][0])).stdout)
    assert scored == metrics
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}" and (out / "mlflow.db").is_file()
    run = _check_mlflow_run(summary["mlflow"]["tracking_uri"], summary, metrics, summary["predictions"], None)
    assert run.info.artifact_uri.startswith((out / "mlartifacts").as_uri())

    # --- VQAv2 and TextVQA (first 4 questions), nested under the pipeline run
    for task, files, extra in (
        ("vqav2", vqav2, ["--questions", vqav2["questions"]]),
        ("textvqa", textvqa, ["--limit", "4", "--ocr", ocr]),  # LLaVA-1.5's OCR-token prompt (the default)
    ):
        out = tmp_path / f"out-{task}"
        proc = _bitllava("eval", "run", "--task", task, "--model", model_dir, "--annotations", *files["annotations"],
                         *extra, "--images", files["images"], "--out", str(out), "--batch-size", "3",
                         "--max-new-tokens", str(MAX_NEW_TOKENS), "--tracking-uri", pipeline_uri,
                         "--mlflow-parent-run-id", parent_id)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        items = json.load(open(summary["predictions"]))
        assert all(set(item) == {"question_id", "answer"} for item in items)
        if task == "vqav2":
            raw = json.load(open(vqav2["questions"]))["questions"]
            asked = [(q["question_id"], short_answer_prompt(q["question"]), f"COCO_val2014_{q['image_id']:012d}.jpg")
                     for q in raw]
        else:
            raw = json.load(open(textvqa["annotations"][0]))["data"][:4]
            tokens = {d["image_id"]: d["ocr_tokens"] for d in json.load(open(ocr))["data"]}
            asked = [(q["question_id"], ocr_prompt(q["question"], tokens[q["image_id"]]), f"{q['image_id']}.jpg")
                     for q in raw]
            assert all("\nReference OCR token: " in prompt for _, prompt, _ in asked)
        assert [item["question_id"] for item in items] == [qid for qid, _, _ in asked]
        expected = _reference_answers(model_dir, [(q, image) for _, q, image in asked], files["images"])
        assert [item["answer"] for item in items] == expected
        metrics = summary["metrics"]
        assert metrics["num_questions"] == len(asked) and metrics["coverage"] == 100.0
        score_args = ["eval", "score", "--task", task, "--predictions", summary["predictions"],
                      "--annotations", *files["annotations"], *extra[:2 if task == "vqav2" else 0]]
        if task == "textvqa":  # the run saw the first 4 of 6 questions
            assert metrics["protocol"] == "llava-1.5-ocr" and summary["protocol"] == "llava-1.5-ocr"
            scored = json.loads(_bitllava(*score_args, "--allow-partial").stdout)
            assert (scored["num_answered"], scored["num_questions"]) == (4, 6)
            assert scored["accuracy"] == metrics["accuracy"] and "protocol" not in scored
        else:
            assert json.loads(_bitllava(*score_args).stdout) == metrics
        _check_mlflow_run(pipeline_uri, summary, metrics, summary["predictions"], parent_id)
        assert summary["mlflow"]["experiment_id"] == experiment_id

    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["eval-textvqa", "eval-vqav2"]
