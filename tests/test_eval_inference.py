"""Batched short-answer inference (no Ray), model folder detection, and the run config's checks."""

import json
import os
import random

import pytest

from components.evaluate.inference import (
    answer_batch,
    batch_prompt_ids,
    is_packed_folder,
    load_eval_model,
    short_answer_prompt,
)
from components.evaluate.run import EvalConfig
from components.synthetic_images import draw_scene, random_scene
from model.chat import generate_reply
from model.checkpoint import LoadedModel, save_model


def test_short_answer_prompt():
    assert short_answer_prompt("What color is the cat?") == (
        "What color is the cat?\nAnswer the question using a single word or phrase.")


def test_batched_answers_equal_one_at_a_time(tiny_mm):
    model, tokenizer, processor = tiny_mm
    loaded = LoadedModel(model, tokenizer, processor, "bitllava")
    rng = random.Random(1)
    images = [draw_scene(random_scene(rng)) for _ in range(3)]
    questions = ["What color is the shape?", "How many circles are there in this picture?", "Is there a square?"]
    input_ids, attention_mask = batch_prompt_ids(loaded, [short_answer_prompt(q) for q in questions])
    lengths = attention_mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # the prompts differ in length, so left padding is exercised
    assert (input_ids[attention_mask == 0] == tokenizer.pad_token_id).all()
    assert attention_mask[:, -1].all()  # padding on the left
    batched = answer_batch(loaded, questions, images, max_new_tokens=6)
    single = [generate_reply(loaded, short_answer_prompt(q), [img], max_new_tokens=6).text
              for q, img in zip(questions, images)]
    assert batched == single
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        answer_batch(loaded, questions[:2], images[:1])


def test_packed_folder_detection(tiny_mm, tmp_path):
    model, tokenizer, processor = tiny_mm
    save_model(str(tmp_path / "ckpt"), model, tokenizer, processor)
    assert not is_packed_folder(str(tmp_path / "ckpt"))
    assert not is_packed_folder(str(tmp_path / "absent"))
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "config.json").write_text(json.dumps({"model_type": "bitllava", "packing": {"format": "2bit"}}))
    assert is_packed_folder(str(packed))
    loaded = load_eval_model(str(tmp_path / "ckpt"))
    assert loaded.multimodal and loaded.layout == "bitllava"


def test_text_only_models_are_refused(tiny_llm, tiny_tokenizer, tmp_path):
    save_model(str(tmp_path / "llm"), tiny_llm, tiny_tokenizer)
    with pytest.raises(ValueError, match="text-only LLM .* evaluation needs a multimodal model"):
        load_eval_model(str(tmp_path / "llm"))


def _config(**changes):
    base = dict(task="pope", model="m", images="imgs", out_dir="out", annotations=["coco_pope_random.json"])
    return EvalConfig(**{**base, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": "okvqa"}, "unknown task 'okvqa'"),
        ({"model": ""}, "model is required"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_actors": 2, "num_cpus": 1}, "2 actors x 1 CPUs do not fit in a local cluster of 1 CPUs"),
        ({"num_cpus": 2, "ray_address": "auto"}, "cannot be combined with ray_address"),
        ({"limit": 0}, "limit must be a positive integer"),
        ({"task": "vqav2"}, "VQAv2 needs its questions file"),
        ({"ocr": "ocr.json"}, "POPE takes no --ocr"),
        ({"annotations": []}, "POPE needs its coco_pope_<split>.json files"),
        ({"task": "mmbench", "annotations": ["mmbench_dev_20230712.tsv"]}, "mmbench files embed their images"),
        ({"task": "gqa", "images": None, "annotations": ["testdev_balanced_questions.json"]}, "images is required"),
        ({"task": "textvqa", "annotations": ["TextVQA_0.5.1_val.json"], "protocol": "ocr-v2"},
         "unknown TextVQA protocol 'ocr-v2'"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_predictor_marks_unreadable_images(tiny_mm, tmp_path):
    """The Ray Data callable, called as an actor would call it: bad images become row errors."""
    import numpy as np

    from components.evaluate.run import AnswerPredictor

    model, tokenizer, processor = tiny_mm
    save_model(str(tmp_path / "m"), model, tokenizer, processor)
    good = tmp_path / "good.png"
    image = draw_scene(random_scene(random.Random(0)))
    image.save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    predictor = AnswerPredictor(str(tmp_path / "m"), max_new_tokens=4, torch_threads=1)
    batch = {"index": np.array([0, 1, 2]),
             "prompt": np.array([short_answer_prompt(q) for q in ("What color?", "What color?", "How many?")]),
             "image": np.array([str(good), str(bad), str(tmp_path / "absent.jpg")])}
    out = predictor(batch)
    assert out["index"].tolist() == [0, 1, 2]
    reference = generate_reply(predictor.loaded, short_answer_prompt("What color?"), [image], max_new_tokens=4)
    assert out["error"][0] == "" and out["answer"][0] == reference.text
    assert out["error"][1].startswith(f"cannot read image {bad}") and out["answer"][1] == ""
    assert "absent.jpg" in out["error"][2]


def test_run_refuses_bad_inputs_before_starting_ray(tiny_mm, tmp_path):
    from components.evaluate.run import run_eval
    from components.evaluate.synthetic_sets import write_pope

    model_dir = str(tmp_path / "m")
    save_model(model_dir, *tiny_mm)
    pope = write_pope(str(tmp_path / "pope"), per_split=2)
    os.remove(os.path.join(pope["images"], "COCO_val2014_000000000101.jpg"))
    common = dict(images=pope["images"], out_dir=str(tmp_path / "out"), annotations=pope["annotations"])
    with pytest.raises(ValueError, match="is not a model folder"):
        run_eval(_config(model=str(tmp_path / "no-model"), **common))
    with pytest.raises(ValueError, match=r"1 image\(s\) are missing from .*: COCO_val2014_000000000101.jpg"):
        run_eval(_config(model=model_dir, **common))
    with pytest.raises(ValueError, match="MLflow parent run 0123456789abcdef is not in the store"):
        run_eval(_config(model=model_dir, limit=1, mlflow_parent_run_id="0123456789abcdef", **common))
