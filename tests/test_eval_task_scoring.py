"""Scoring rules of every task, on small hand-made files in the published layouts, against expectations
computed by hand from the official scripts (GQA eval.py, eval_science_qa.py, MME calculation.py,
SEED-Bench's first-letter rule, VLMEvalKit's CircularEval with can_infer_option, LLaVA's VQAv2
submission and TextVQA/POPE question files)."""

import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from components.evaluate.datasets import load_eval_set
from components.evaluate.predictions import write_predictions
from components.evaluate.scoring import score_files
from components.evaluate.tasks.mmbench import can_infer_option
from components.evaluate.tasks.mme import parse_answer
from components.evaluate.tasks.scienceqa import extract_answer, is_correct
from components.evaluate.tasks.vqav2 import write_submission


def _json(path, payload):
    path.write_text(json.dumps(payload))
    return str(path)


def _lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------------------------------------- GQA


def _gqa_question(question, answer, structural, semantic, balanced=True):
    return {"imageId": "n1", "question": question, "answer": answer, "isBalanced": balanced,
            "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}


def test_gqa_exact_match_over_balanced_questions(tmp_path):
    path = _json(tmp_path / "testdev_balanced_questions.json", {
        "1": _gqa_question("What color is it?", "red", "query", "attr"),
        "2": _gqa_question("Is it red?", "yes", "verify", "attr"),
        "3": _gqa_question("Is it blue?", "no", "verify", "attr"),
        "4": _gqa_question("Which side?", "left", "query", "rel", balanced=False),
        "5": _gqa_question("What animal is it?", "cat", "query", "obj"),
    })
    eval_set = load_eval_set("gqa", [path])
    replies = {"1": "Red.", "2": "yes", "3": "Yes", "4": "right", "5": "the cat"}
    predictions = str(tmp_path / "testdev_balanced_predictions.json")
    write_predictions(predictions, eval_set, {q.key: replies[q.question_id] for q in eval_set.questions})
    written = json.load(open(predictions))
    # convert_gqa_for_eval.py: trailing period stripped, lower-cased
    assert written[0] == {"questionId": "1", "prediction": "red"} and written[2]["prediction"] == "yes"
    metrics = score_files("gqa", predictions, [path])
    # balanced: 1 right, 2 right, 3 wrong ("yes" vs "no"), 5 wrong (no article stripping); 4 is not balanced
    assert metrics["accuracy"] == 50.0 and metrics["num_balanced"] == 4
    assert metrics["binary"] == 50.0 and metrics["open"] == 50.0
    assert metrics["per_structural_type"] == {"query": 50.0, "verify": 50.0}
    assert metrics["per_semantic_type"] == {"attr": pytest.approx(200 / 3), "obj": 0.0}
    # eval.py itself compares exactly: an unconverted "Red." is wrong
    raw = _json(tmp_path / "raw.json", [{"questionId": k, "prediction": v} for k, v in replies.items()])
    assert score_files("gqa", raw, [path])["accuracy"] == 25.0


# ----------------------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text, letter", [
    ("A", "A"),                              # a bare letter
    ("B. blue", "B"),                        # "<letter>. ..."
    ("The answer is C.", "C"),               # the one match of `The answer is ([A-Z]).`
    ("The answer is AB", "A"),               # the pattern's "." matches any character
    ("The answer is C", "FAILED"),           # no character after the letter: no match
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("a", "FAILED"),                         # lower case is not an option
    ("C.", "FAILED"),                        # too short for "<letter>. " and no pattern
    (" A", "FAILED"),                        # a leading space
    ("F", "FAILED"),                         # options are A-E only
])
def test_scienceqa_letter_extraction(text, letter):
    assert extract_answer(text) == letter


def test_scienceqa_letters_beyond_the_choices_are_wrong():
    assert is_correct("C", 3, "C") and not is_correct("E", 3, "E") and not is_correct("D", 3, "D")


def _science_folder(tmp_path):
    problems = {
        "1": {"question": "Which color?", "choices": ["red", "blue"], "answer": 0, "hint": "", "image": "image.png",
              "subject": "natural science"},
        "2": {"question": "Which shape?", "choices": ["circle", "square", "star"], "answer": 1, "hint": "Look.",
              "image": "image.png", "subject": "natural science"},
        "3": {"question": "Which size?", "choices": ["small", "big", "tiny"], "answer": 2, "hint": "",
              "image": "image.png", "subject": "language science"},
        "4": {"question": "Which word?", "choices": ["cat", "dog"], "answer": 0, "hint": "", "image": None,
              "subject": "language science"},
        "5": {"question": "Train only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png"},
    }
    _json(tmp_path / "problems.json", problems)
    _json(tmp_path / "pid_splits.json", {"train": ["5"], "val": [], "test": ["1", "2", "3", "4"]})
    return str(tmp_path)


def test_scienceqa_accuracy_over_image_questions(tmp_path):
    folder = _science_folder(tmp_path)
    eval_set = load_eval_set("scienceqa", [folder])
    assert [q.question_id for q in eval_set.questions] == ["1", "2", "3"]  # 4 is text-only, 5 is train
    assert eval_set.questions[1].prompt == ("Context: Look.\nWhich shape?\nA. circle\nB. square\nC. star\n"
                                            "Answer with the option's letter from the given choices directly.")
    assert eval_set.questions[0].prompt.startswith("Which color?\nA. red\nB. blue\n")  # no hint, no context line
    answers = _lines(tmp_path / "answers.jsonl", [
        {"question_id": "1", "prompt": "<image>\n...", "text": "A"},
        {"question_id": "2", "prompt": "<image>\n...", "text": "B. square"},
        {"question_id": "3", "prompt": "<image>\n...", "text": "The answer is C"},  # no match: failed
    ])
    metrics = score_files("scienceqa", answers, [folder])
    assert metrics["accuracy"] == pytest.approx(200 / 3) and metrics["correct"] == 2
    assert metrics["failed_extractions"] == 1 and metrics["text_only_questions_left_out"] == 1
    assert metrics["per_subject"] == {"language science": 0.0, "natural science": 100.0}


# ----------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize("reply, parsed", [
    ("yes", "yes"), ("No", "no"), ("Yes, there is a dog.", "yes"), ("not sure", "no"), ("eyes open", "yes"),
    ("maybe", "other"), ("There is no dog", "other"),  # only the first 4 characters count
])
def test_mme_answer_parsing(reply, parsed):
    assert parse_answer(reply) == parsed


def _mme_release(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    image = Image.new("RGB", (8, 8))
    layout = {  # subtask -> (text folder, image folder)
        "existence": ("existence", "existence"),
        "artwork": ("artwork/questions_answers_YN", "artwork/images"),
        "numerical_calculation": ("numerical_calculation", "numerical_calculation"),
    }
    for subtask, (text_dir, image_dir) in layout.items():
        (root / text_dir).mkdir(parents=True, exist_ok=True)
        (root / image_dir).mkdir(parents=True, exist_ok=True)
        for stem in ("0001", "0002"):
            image.save(root / image_dir / f"{stem}.png")
            (root / text_dir / f"{stem}.txt").write_text(
                f"Is there a {subtask} {stem}? Please answer yes or no.\tYes\n"
                f"Is there no {subtask} {stem}? Please answer yes or no.\tNo\n")
    return str(root)


def test_mme_acc_acc_plus_and_totals(tmp_path):
    root = _mme_release(tmp_path)
    eval_set = load_eval_set("mme", [root])
    assert eval_set.splits == ("existence", "artwork", "numerical_calculation")
    assert eval_set.questions[4].image == os.path.join("artwork", "images", "0001.png")
    replies = {
        # existence: image 1 both right; image 2 "not sure" reads as "no" (wrong), "no" right -> acc 75, acc+ 50
        ("existence", "0001.png", "Yes"): "Yes, there is.", ("existence", "0001.png", "No"): "No",
        ("existence", "0002.png", "Yes"): "not sure", ("existence", "0002.png", "No"): "no",
        # artwork: "eyes" holds "yes" (right), "maybe" is "other" (wrong); image 2 both wrong -> acc 25, acc+ 0
        ("artwork", "0001.png", "Yes"): "eyes", ("artwork", "0001.png", "No"): "maybe",
        ("artwork", "0002.png", "Yes"): "No", ("artwork", "0002.png", "No"): "Yes",
        # numerical_calculation: all right -> 100 + 100
        ("numerical_calculation", "0001.png", "Yes"): "yes", ("numerical_calculation", "0001.png", "No"): "no",
        ("numerical_calculation", "0002.png", "Yes"): "yes", ("numerical_calculation", "0002.png", "No"): "no",
    }
    answers = {q.key: replies[(q.split, q.info["image_name"], q.answers[0])] for q in eval_set.questions}
    results = str(tmp_path / "mme_results")
    write_predictions(results, eval_set, answers)
    lines = open(os.path.join(results, "artwork.txt")).read().splitlines()
    assert lines[0] == "0001.png\tIs there a artwork 0001? Please answer yes or no.\tYes\teyes"  # the eval_tool layout
    metrics = score_files("mme", results, [root])
    existence, artwork = metrics["per_subtask"]["existence"], metrics["per_subtask"]["artwork"]
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert (artwork["acc"], artwork["acc_plus"], artwork["score"]) == (25.0, 0.0, 25.0)
    assert metrics["per_subtask"]["numerical_calculation"]["score"] == 200.0
    assert metrics["perception"] == 150.0 and metrics["perception_subtasks"] == 2 and metrics["perception_max"] == 400
    assert metrics["cognition"] == 200.0 and metrics["cognition_max"] == 200
    assert "count" in metrics["missing_subtasks"]


# ------------------------------------------------------------------------------------------ SEED-Bench


def test_seed_first_letter_exact_match(tmp_path):
    def q(qid, answer, type_id):
        return {"answer": answer, "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
                "data_id": f"{qid}.jpg", "data_type": "image", "question": "?", "question_id": qid,
                "question_type_id": type_id}
    path = _json(tmp_path / "SEED-Bench.json", {
        "questions": [q("1", "B", 1), q("2", "B", 1), q("3", "C", 2), q("4", "A", 2), q("5", "D", 2),
                      {**q("v1", "A", 10), "data_type": "video"}],
        "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}})
    predictions = _lines(tmp_path / "seed.jsonl", [
        {"question_id": "1", "prediction": " B) b"},   # stripped, first letter B: right
        {"question_id": "2", "prediction": "b"},       # lower case: wrong
        {"question_id": "3", "prediction": "Answer: C"},  # first letter "A": wrong
        {"question_id": "4", "prediction": "Answer: C"},  # first letter "A": right by the rule
        {"question_id": "5", "prediction": ""},        # empty: wrong
    ])
    metrics = score_files("seed", predictions, [path])
    assert metrics["per_question_type"] == {"Scene Understanding": 50.0, "Instance Identity": pytest.approx(100 / 3)}
    assert metrics["accuracy"] == 40.0 and metrics["video_questions_left_out"] == 1


# --------------------------------------------------------------------------------------------- MMBench


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"),
    ("The answer is (C).", "C"),
    ("I think it is B", "B"),
    ("A or B", False),                       # two letters
    ("B is right because the shapes in the picture are all round", False),  # letter too far from the end
    ("blue", False),                         # no letter (no text matching, no GPT matcher)
    ("Z", "Z"),
    ("Cannot determine the answer", "Z"),
    ("The correct answer is **D**, since ...", "D"),  # VLMEvalKit's verbose-answer pattern
])
def test_mmbench_letter_matching(reply, letter):
    assert can_infer_option(reply, {"A": "red", "B": "blue", "C": "green", "D": "pink"}) == letter


def _b64_image():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _mmbench_tsv(path, rows):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in columns} for r in rows)
    return str(path)


def test_mmbench_circular_eval_needs_every_rotation(tmp_path):
    image = _b64_image()
    rows = [
        {"index": 0, "question": "Colour?", "hint": "A red square.", "A": "red", "B": "blue", "C": "green", "D": "pink",
         "answer": "A", "category": "colour", "image": image, "l2-category": "FP-S", "split": "dev"},
        {"index": 1, "question": "Shape?", "hint": "nan", "A": "square", "B": "circle", "C": "star", "D": "",
         "answer": "A", "category": "shape", "image": image, "l2-category": "FP-S", "split": "dev"},
    ]
    path = _mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)  # no copies: the loader rotates
    eval_set = load_eval_set("mmbench", [path])
    by_id = {q.question_id: q for q in eval_set.questions}
    assert sorted(by_id) == [0, 1, 1000000, 1000001, 2000000, 2000001, 3000000]
    assert by_id[0].prompt == ("A red square.\nColour?\nA. red\nB. blue\nC. green\nD. pink\n"
                               "Answer with the option's letter from the given choices directly.")
    assert by_id[1].prompt.startswith("Shape?\nA. square")  # "nan" hint: none
    # round r shows options[r:] + options[:r]: "red" moves to D, C, B
    assert by_id[1000000].choices == ("blue", "green", "pink", "red") and by_id[1000000].answers == ("D",)
    assert by_id[3000000].answers == ("B",) and by_id[2000001].answers == ("B",)
    replies = {0: "A", 1000000: "D", 2000000: "C", 3000000: "C",  # question 0: right in 3 of 4 rotations
               1: "A", 1000001: "The answer is C.", 2000001: "B"}  # question 1: right in all 3
    predictions = _lines(tmp_path / "mmbench_answers.jsonl",
                         [{"question_id": k, "round_id": k // 1000000, "text": v} for k, v in replies.items()])
    metrics = score_files("mmbench", predictions, [path])
    assert metrics["accuracy"] == 50.0 and metrics["circular_questions"] == 2
    assert metrics["vanilla_accuracy"] == 100.0  # the original rows alone are both right
    assert metrics["per_category"] == {"colour": 0.0, "shape": 100.0}
    assert "no GPT matcher" in metrics["matcher"] and metrics["evaluation"] == "CircularEval"
    # a group with a rotation unanswered is left out under --allow-partial
    partial = _lines(tmp_path / "partial.jsonl", [{"question_id": k, "text": v} for k, v in replies.items()
                                                   if k != 3000000])
    with pytest.raises(ValueError, match="--allow-partial"):
        score_files("mmbench", partial, [path])
    metrics = score_files("mmbench", partial, [path], allow_partial=True)
    assert metrics["circular_questions"] == 1 and metrics["accuracy"] == 100.0


def test_mmbench_copies_in_the_file_share_the_original_image(tmp_path):
    image = _b64_image()
    rows = [{"index": 5, "question": "Colour?", "A": "red", "B": "blue", "answer": "B", "category": "c",
             "image": image},
            {"index": 1000005, "question": "Colour?", "A": "blue", "B": "red", "answer": "A", "category": "c",
             "image": "5"}]
    eval_set = load_eval_set("mmbench", [_mmbench_tsv(tmp_path / "m.tsv", rows)])
    assert [q.question_id for q in eval_set.questions] == [5, 1000005]
    assert eval_set.questions[1].image_data == image and eval_set.notes["circular_copies"] == "from the file"


# ------------------------------------------------------------------------------- VQAv2 test-dev, TextVQA


def test_vqav2_submission_names_every_test_question(tmp_path):
    dev = _lines(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 1000, "image": "COCO_test2015_000000000001.jpg", "text": "How many?\nAnswer the question "
         "using a single word or phrase.", "category": "default"},
        {"question_id": 2000, "image": "COCO_test2015_000000000002.jpg", "text": "Is it?\nAnswer the question using "
         "a single word or phrase.", "category": "default"}])
    full = _lines(tmp_path / "llava_vqav2_mscoco_test2015.jsonl", [
        {"question_id": i, "image": "x.jpg", "text": "?"} for i in (3000, 1000, 2000)])
    eval_set = load_eval_set("vqav2", [], dev, test_questions=full, for_run=True)
    assert eval_set.splits == ("test-dev2015",) and not eval_set.has_ground_truth
    assert eval_set.questions[0].question == "How many?" and eval_set.questions[0].prompt.endswith("phrase.")
    path = str(tmp_path / "submission.json")
    answers = {eval_set.questions[0].key: "Two.", eval_set.questions[1].key: "Yes, it is"}
    assert write_submission(path, eval_set, answers, full) == 3
    # convert_vqav2_for_submission.py: EvalAI-normalised answers, "" for test questions not asked, file order
    assert json.load(open(path)) == [{"question_id": 3000, "answer": ""}, {"question_id": 1000, "answer": "2"},
                                     {"question_id": 2000, "answer": "yes it is"}]
    with pytest.raises(ValueError, match="pass the full list with --test-questions"):
        load_eval_set("vqav2", [], dev, for_run=True)
    short = _lines(tmp_path / "short.jsonl", [{"question_id": 1000}])
    with pytest.raises(ValueError, match=r"1 question\(s\) of .* are not in the test list .*short.jsonl \(2000\)"):
        load_eval_set("vqav2", [], dev, test_questions=short, for_run=True)


def _textvqa(tmp_path):
    answers = ["stop"] * 10
    data = [{"question_id": 1, "question": "what does the sign say?", "image_id": "aa", "answers": answers,
             "set_name": "val"},
            {"question_id": 2, "question": "what brand is it?", "image_id": "bb", "answers": answers,
             "set_name": "val"}]
    val = _json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "data": data})
    ocr = _json(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [
        {"image_id": "aa", "ocr_tokens": ["STOP", "sign"]}, {"image_id": "bb", "ocr_tokens": []}]})
    return val, ocr


def test_textvqa_protocols(tmp_path):
    val, ocr = _textvqa(tmp_path)
    with_ocr = load_eval_set("textvqa", [val], ocr=ocr, for_run=True)
    assert with_ocr.protocol == "llava-1.5-ocr"
    assert with_ocr.questions[0].prompt == ("what does the sign say?\nReference OCR token: STOP, sign\n"
                                            "Answer the question using a single word or phrase.")
    assert with_ocr.questions[1].prompt == "what brand is it?\nAnswer the question using a single word or phrase."
    plain = load_eval_set("textvqa", [val], protocol="no-ocr", for_run=True)
    assert plain.protocol == "no-ocr" and "OCR" not in plain.questions[0].prompt
    # LLaVA's question file: matched by (image id, question) as eval_textvqa.py, prompts kept as written
    llava = _lines(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "bb", "image": "bb.jpg", "text": "What brand is it?\nAnswer the question using a single "
         "word or phrase."},
        {"question_id": "aa", "image": "aa.jpg", "text": "what does the sign say?\nReference OCR token: Stop\n"
         "Answer the question using a single word or phrase."}])
    from_llava = load_eval_set("textvqa", [val], llava, for_run=True)
    assert from_llava.questions[0].prompt.endswith("Reference OCR token: Stop\nAnswer the question using a single "
                                                   "word or phrase.")
    assert from_llava.questions[1].prompt.startswith("What brand is it?")
    with pytest.raises(ValueError, match="pass --ocr TextVQA_Rosetta_OCR_v0.2_val.json or --questions"):
        load_eval_set("textvqa", [val], for_run=True)
    scored = load_eval_set("textvqa", [val])  # scoring needs no prompts, and names no protocol it was not told
    assert scored.protocol is None


def test_pope_from_llava_question_lines(tmp_path):
    labels = {"random": ["yes", "no"], "adversarial": ["no", "yes"]}
    files = [_lines(tmp_path / f"coco_pope_{split}.json", [
        {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a dog {i}?", "label": label}
        for i, label in enumerate(split_labels)]) for split, split_labels in labels.items()]
    suffix = "\nAnswer the question using a single word or phrase."
    llava = _lines(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10 + n, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a dog {i}?{suffix}",
         "category": split} for n, (split, i) in enumerate([("adversarial", 0), ("random", 0), ("adversarial", 1),
                                                             ("random", 1)])])
    eval_set = load_eval_set("pope", files, llava)
    assert [(q.question_id, q.split, q.label) for q in eval_set.questions] == [
        (10, "adversarial", "no"), (11, "random", "yes"), (12, "adversarial", "yes"), (13, "random", "no")]
    assert eval_set.questions[0].prompt == f"Is there a dog 0?{suffix}"
    # LLaVA's answer files carry no category: ids numbered across the splits find their split
    answers = _lines(tmp_path / "answers.jsonl", [{"question_id": 10 + n, "text": t}
                                                  for n, t in enumerate(["No", "Yes", "No", "No"])])
    metrics = score_files("pope", answers, files, llava)
    assert metrics["splits"]["adversarial"]["accuracy"] == 50.0 and metrics["splits"]["random"]["accuracy"] == 100.0
    wrong = _lines(tmp_path / "bad_llava.jsonl", [{"question_id": 1, "image": "other.jpg", "text": "Is there a dog 0?",
                                                   "category": "random"}])
    with pytest.raises(ValueError, match="mismatched POPE files: .*question 1 of 'random' is other.jpg"):
        load_eval_set("pope", files, wrong)
