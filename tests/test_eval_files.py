"""Official file formats: loaders, result files, and every bad input `eval score` must refuse."""

import json
import os
import subprocess
import sys

import pytest

from components.evaluate.datasets import load_eval_set
from components.evaluate.predictions import prediction_filename, write_predictions
from components.evaluate.scoring import score_files
from components.evaluate.synthetic_sets import write_pope, write_textvqa, write_vqav2

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {
        "pope": write_pope(str(root / "pope"), per_split=4),
        "vqav2": write_vqav2(str(root / "vqav2"), num_questions=6),
        "textvqa": write_textvqa(str(root / "textvqa"), num_questions=4),
    }


def _load(sets, task):
    return load_eval_set(task, sets[task]["annotations"], sets[task].get("questions"))


def _vqa_file(path, items):
    path.write_text(json.dumps(items))
    return str(path)


def test_loaders_read_the_official_layouts(sets):
    pope = _load(sets, "pope")
    assert pope.splits == ("random", "popular", "adversarial") and len(pope.questions) == 12
    assert pope.questions[0].image == "COCO_val2014_000000000100.jpg" and pope.questions[0].label == "yes"
    vqa = _load(sets, "vqav2")
    first = vqa.questions[0]
    assert first.image == "COCO_val2014_000000001000.jpg" and len(first.answers) == 10
    assert {q.answer_type for q in vqa.questions} == {"other", "number", "yes/no"}
    text = _load(sets, "textvqa")
    assert text.splits == ("val",) and text.questions[0].image.endswith(".jpg") and len(text.questions[0].answers) == 10
    for task in ("vqav2", "textvqa"):  # every image named by the files exists
        eval_set = _load(sets, task)
        assert all(os.path.isfile(os.path.join(sets[task]["images"], q.image)) for q in eval_set.questions)


def test_human_answers_score_full_marks(sets, tmp_path):
    """The majority human answer, written in the official result format, scores 100."""
    for task in ("vqav2", "textvqa"):
        eval_set = _load(sets, task)
        path = str(tmp_path / prediction_filename(task))
        write_predictions(path, eval_set, {q.key: q.answers[0] for q in eval_set.questions})
        metrics = score_files(task, path, sets[task]["annotations"], sets[task].get("questions"))
        assert metrics["accuracy"] == 100.0, task
        assert json.load(open(path))[0].keys() == {"question_id", "answer"}
    pope = _load(sets, "pope")
    path = str(tmp_path / "pope.jsonl")
    write_predictions(path, pope, {q.key: q.label.capitalize() + "." for q in pope.questions})
    metrics = score_files("pope", path, sets["pope"]["annotations"])
    assert metrics["mean"]["accuracy"] == 100.0 and metrics["mean"]["yes_ratio"] == 50.0


def test_dissenting_answers_score_by_hand(sets, tmp_path):
    """Answer every question with its one dissenting human answer (the 10th).

    VQAv2 colour: humans say 7 x "red", "Red", "red.", 1 x "blue"; processPunctuation keeps "Red" but
    strips "red." -> one "blue" among 10 -> 0.3. Count: 6 x "2", 3 x "two", 1 x "3" -> "3" matches once
    -> 0.3. Yes/no: the dissenter is "Yes"/"No" (capitalised, left as is), the prediction the opposite
    word -> 0. TextVQA: 9 answers normalise to the word, the 10th is another word -> 0.3.
    """
    expected = {"vqav2": {"accuracy": 20.0, "per_answer_type": {"number": 30.0, "other": 30.0, "yes/no": 0.0}},
                "textvqa": {"accuracy": 30.0}}
    for task in ("vqav2", "textvqa"):
        eval_set = _load(sets, task)
        answers = {}
        for q in eval_set.questions:
            answers[q.key] = ({"yes": "no", "no": "yes"}[q.answers[0]] if q.answer_type == "yes/no" else q.answers[9])
        path = str(tmp_path / prediction_filename(task))
        write_predictions(path, eval_set, answers)
        metrics = score_files(task, path, sets[task]["annotations"], sets[task].get("questions"))
        assert metrics["accuracy"] == pytest.approx(expected[task]["accuracy"])
        if task == "vqav2":
            assert metrics["per_answer_type"] == pytest.approx(expected[task]["per_answer_type"])


def test_missing_ids_need_allow_partial_and_report_coverage(sets, tmp_path):
    eval_set = _load(sets, "vqav2")
    items = [{"question_id": q.question_id, "answer": q.answers[0]} for q in eval_set.questions[:4]]
    path = _vqa_file(tmp_path / "partial.json", items)
    missing = [str(q.question_id) for q in eval_set.questions[4:]]
    with pytest.raises(ValueError, match="answer 4 of 6 questions; missing question ids: " + ", ".join(missing)):
        score_files("vqav2", path, sets["vqav2"]["annotations"], sets["vqav2"]["questions"])
    metrics = score_files("vqav2", path, sets["vqav2"]["annotations"], sets["vqav2"]["questions"], allow_partial=True)
    assert (metrics["num_questions"], metrics["num_answered"]) == (6, 4)
    assert metrics["coverage"] == pytest.approx(400 / 6) and metrics["accuracy"] == 100.0


def test_unknown_duplicate_and_malformed_vqa_predictions(sets, tmp_path):
    ann, questions = sets["vqav2"]["annotations"], sets["vqav2"]["questions"]
    ids = [q.question_id for q in _load(sets, "vqav2").questions]
    unknown = _vqa_file(tmp_path / "u.json", [{"question_id": i, "answer": "x"} for i in ids] +
                        [{"question_id": 777, "answer": "x"}])
    with pytest.raises(ValueError, match=r"1 prediction\(s\) name questions that are not in .*: 777"):
        score_files("vqav2", unknown, ann, questions, allow_partial=True)  # never forgiven
    duplicate = _vqa_file(tmp_path / "d.json", [{"question_id": i, "answer": "x"} for i in ids + ids[:1]])
    with pytest.raises(ValueError, match=rf"answered twice: {ids[0]} \("):
        score_files("vqav2", duplicate, ann, questions)
    as_strings = _vqa_file(tmp_path / "s.json", [{"question_id": str(i), "answer": "x"} for i in ids])
    with pytest.raises(ValueError, match="ids are of type int"):
        score_files("vqav2", as_strings, ann, questions)
    no_answer = _vqa_file(tmp_path / "n.json", [{"question_id": ids[0], "text": "x"}])
    with pytest.raises(ValueError, match=r"item 0: 'answer' must be a string"):
        score_files("vqav2", no_answer, ann, questions)
    jsonl = tmp_path / "l.json"
    jsonl.write_text("".join(json.dumps({"question_id": i, "answer": "x"}) + "\n" for i in ids))
    with pytest.raises(ValueError, match="looks like JSON lines"):
        score_files("vqav2", str(jsonl), ann, questions)
    not_a_list = _vqa_file(tmp_path / "o.json", {"question_id": 1, "answer": "x"})
    with pytest.raises(ValueError, match="must hold a JSON array"):
        score_files("vqav2", not_a_list, ann, questions)
    with pytest.raises(ValueError, match="does not exist"):
        score_files("vqav2", str(tmp_path / "absent.json"), ann, questions)


def test_malformed_pope_lines_are_named(sets, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "text": "yes", "category": "random"}\n'
                    "not json\n"
                    '{"question_id": 2, "category": "random"}\n'
                    '["a list"]\n')
    with pytest.raises(ValueError) as err:
        score_files("pope", str(path), sets["pope"]["annotations"])
    message = str(err.value)
    assert "3 bad line(s)" in message and "line 2: not valid JSON" in message
    assert "line 3: 'text' must be a string" in message and "line 4: expected a JSON object" in message


def test_pope_splits_need_categories(sets, tmp_path):
    path = tmp_path / "nocat.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "text": "yes"}) + "\n" for i in (1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"have no 'category'.*random, popular, adversarial"):
        score_files("pope", str(path), sets["pope"]["annotations"])
    wrong = tmp_path / "wrongcat.jsonl"
    wrong.write_text(json.dumps({"question_id": 1, "text": "yes", "category": "gqa"}) + "\n")
    with pytest.raises(ValueError, match="gqa/1"):
        score_files("pope", str(wrong), sets["pope"]["annotations"], allow_partial=True)


def test_mismatched_annotation_files(sets, tmp_path):
    questions = json.load(open(sets["vqav2"]["questions"]))
    dropped = dict(questions, questions=questions["questions"][1:] + [
        {"image_id": 1000, "question": "extra?", "question_id": 42}])
    q_path = tmp_path / "q.json"
    q_path.write_text(json.dumps(dropped))
    first_id = questions["questions"][0]["question_id"]
    with pytest.raises(ValueError, match=rf"mismatched files.*1 question\(s\) have no annotation \(42\); "
                                         rf"1 annotation\(s\) have no question \({first_id}\)"):
        load_eval_set("vqav2", sets["vqav2"]["annotations"], str(q_path))
    other_split = dict(questions, data_subtype="test2015")
    q_path.write_text(json.dumps(other_split))
    with pytest.raises(ValueError, match="'test2015' but .* is 'val2014'"):
        load_eval_set("vqav2", sets["vqav2"]["annotations"], str(q_path))
    with pytest.raises(ValueError, match="is not a VQAv2 annotations file"):
        load_eval_set("vqav2", [sets["vqav2"]["questions"]], sets["vqav2"]["questions"])
    bad_label = tmp_path / "coco_pope_random.json"
    bad_label.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "?", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random.json:1: label must be 'yes' or 'no'"):
        load_eval_set("pope", [str(bad_label)])


def test_test_split_without_answers_is_not_scored(sets, tmp_path):
    data = json.load(open(sets["textvqa"]["annotations"][0]))
    for item in data["data"]:
        del item["answers"]
    test_file = tmp_path / "TextVQA_0.5.1_test.json"
    test_file.write_text(json.dumps(data))
    predictions = _vqa_file(tmp_path / "p.json", [{"question_id": d["question_id"], "answer": "x"} for d in data["data"]])
    with pytest.raises(ValueError, match="holds no answers to score against"):
        score_files("textvqa", predictions, [str(test_file)])


def _cli(*args):
    return subprocess.run([BIN, "eval", "score", *args], capture_output=True, text=True, timeout=120)


def test_cli_score_prints_one_json_object_and_refuses_bad_files(sets, tmp_path):
    eval_set = _load(sets, "textvqa")
    path = str(tmp_path / "t.json")
    write_predictions(path, eval_set, {q.key: ("stop" if i % 2 else q.answers[0]) for i, q in
                                       enumerate(eval_set.questions)})
    proc = _cli("--task", "textvqa", "--predictions", path, "--annotations", *sets["textvqa"]["annotations"])
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics == score_files("textvqa", path, sets["textvqa"]["annotations"])
    assert metrics["task"] == "textvqa" and 0 < metrics["accuracy"] <= 100

    partial = _vqa_file(tmp_path / "partial.json", [{"question_id": eval_set.questions[0].question_id, "answer": "x"}])
    proc = _cli("--task", "textvqa", "--predictions", partial, "--annotations", *sets["textvqa"]["annotations"])
    assert proc.returncode == 2 and "--allow-partial" in proc.stderr and proc.stdout == ""
    proc = _cli("--task", "textvqa", "--predictions", partial, "--annotations", *sets["textvqa"]["annotations"],
                "--allow-partial")
    assert proc.returncode == 0 and json.loads(proc.stdout)["coverage"] == 25.0
    proc = _cli("--task", "pope", "--predictions", partial, "--annotations", sets["vqav2"]["questions"])
    assert proc.returncode == 2 and "bitllava: error:" in proc.stderr
