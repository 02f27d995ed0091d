"""Scoring against hand-computed values: EvalAI normalisation rule by rule, the leave-one-out
VQA accuracy, the VQAv2 and TextVQA differences, POPE parsing and metrics."""

import json

import pytest

from components.evaluate.answer_processing import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_MAP,
    normalize_answer,
    process_punctuation,
)
from components.evaluate.scoring import (
    flatten_metrics,
    leave_one_out_accuracy,
    pope_answer,
    pope_metrics,
    score_files,
    textvqa_accuracy,
    vqav2_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  Two Dogs\n", "2 dogs"),  # lower-case, strip, number word
        ("red\tcar", "red car"),  # tabs and newlines become spaces
        ("1,000", "1000"),  # commas are deleted first (word_tokenize)
        ("why?", "why"),  # question marks deleted
        ("The man's hat?", "man 's hat"),  # possessive split off, article dropped
        ("Yes.", "yes"),  # a period not followed by a digit is stripped
        ("3.5", "3.5"),  # a decimal point stays
        ("a.b", "ab"),
        ("red/blue", "red blue"),  # a mark touching no space becomes a space
        ("t-shirt - white", "tshirt white"),  # a mark that touches a space anywhere is deleted everywhere
        ("wow!", "wow"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten (and none) are mapped
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("the", ""),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the table's capitalised keys never match lower-cased words
        ("." * 40, "." * 8),  # the official call strips at most 32 periods (re.UNICODE lands in `count`)
    ],
)
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_comma_between_digits():
    # a comma between digits anywhere makes every mark be deleted rather than spaced out
    assert process_punctuation("1,000 (approx)") == "1000 approx"
    # without it: "," touches no space -> space; "(" follows a space -> deleted; ")" touches none -> space
    assert process_punctuation("red,blue (approx)") == "red blue approx "


def test_official_tables():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["wouldnt've"] == "wouldn't've" and CONTRACTIONS["twas"] == "'twas"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # the original's inverted entry
    assert NUMBER_MAP == {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                          "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    assert ARTICLES == ("a", "an", "the")


@pytest.mark.parametrize(
    "matches, expected",
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets keep the match: 9 * (1/3) / 10
        (2, 0.6),  # 2 subsets keep 1 match (1/3), 8 keep 2 (2/3): (2/3 + 16/3) / 10
        (3, 0.9),  # 3 subsets keep 2 (2/3), 7 keep 3 (1): (2 + 7) / 10
        (4, 1.0),  # every subset keeps at least 3
        (10, 1.0),
    ],
)
def test_leave_one_out_average(matches, expected):
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert leave_one_out_accuracy("cat", humans) == pytest.approx(expected)


def test_textvqa_normalises_prediction_and_every_human_answer():
    assert textvqa_accuracy("T-Shirt", ["t-shirt"] * 10) == 1.0
    assert textvqa_accuracy("Two.", ["2"] * 2 + ["three"] * 8) == pytest.approx(0.6)
    assert textvqa_accuracy("3", ["2"] * 2 + ["three"] * 8) == 1.0


def test_vqav2_processes_human_answers_only_when_they_disagree():
    # identical human answers are compared as they are (vqaEval.py)
    assert vqav2_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqav2_accuracy("t shirt", ["t-shirt"] * 10) == 0.0
    # disagreeing answers go through processPunctuation: "t-shirt" -> "t shirt"
    assert vqav2_accuracy("T-Shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    # processPunctuation only: number words of human answers stay words
    assert vqav2_accuracy("two", ["two"] * 10) == 0.0
    assert vqav2_accuracy("two", ["two"] * 5 + ["2"] * 5) == 1.0
    # a comma between digits is removed from human answers: 3 x "1,000" join the single "1000"
    assert vqav2_accuracy("1000", ["1,000"] * 3 + ["1000"] + ["ten"] * 6) == 1.0
    assert vqav2_accuracy("1000", ["1000"] + ["ten"] * 9) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is no dog", "no"),
        ("I do not see one", "no"),
        ("Not really", "yes"),  # only "No", "not", "no" count
        ("NO", "yes"),
        ("I see a dog. No cat.", "yes"),  # only the first sentence counts
        ("no,it is absent", "yes"),  # commas are deleted, not spaced: "noit"
        ("", "yes"),
    ],
)
def test_pope_answer_parsing(text, expected):
    assert pope_answer(text) == expected


def test_pope_metrics_division_by_zero_is_zero():
    metrics = pope_metrics([("no", "yes"), ("no", "no")])
    assert metrics["precision"] == 0.0 and metrics["f1"] == 0.0 and metrics["accuracy"] == 50.0


def _write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def pope_files(tmp_path):
    labels = {"random": ["yes"] * 4 + ["no"] * 4, "popular": ["yes", "no", "yes", "no"]}
    files = []
    for split, split_labels in labels.items():
        files.append(_write_lines(tmp_path / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": "Is there a dog in the image?",
             "label": label} for i, label in enumerate(split_labels)]))
    answers = {"random": ["Yes, there is a dog.", "yes", "No.", "Not really", "There is no cat in the image.", "Yes",
                          "I do not see one", "NO"],
               "popular": ["No"] * 4}
    predictions = _write_lines(tmp_path / "answers.jsonl", [
        {"question_id": i + 1, "prompt": "...", "text": text, "category": split}
        for split, texts in answers.items() for i, text in enumerate(texts)])
    return files, predictions


def test_pope_metrics_on_hand_made_files(pope_files):
    files, predictions = pope_files
    metrics = score_files("pope", predictions, files)
    random_split = metrics["splits"]["random"]
    # random: TP 3 (answers 1, 2, 4), FN 1 (3), TN 2 (5, 7), FP 2 (6, 8)
    assert (random_split["tp"], random_split["fp"], random_split["tn"], random_split["fn"]) == (3, 2, 2, 1)
    assert random_split["accuracy"] == pytest.approx(62.5)
    assert random_split["precision"] == pytest.approx(60.0)
    assert random_split["recall"] == pytest.approx(75.0)
    assert random_split["f1"] == pytest.approx(200 / 3)
    assert random_split["yes_ratio"] == pytest.approx(62.5)
    popular = metrics["splits"]["popular"]  # all "no": TN 2, FN 2, no "yes" at all
    assert (popular["accuracy"], popular["precision"], popular["recall"], popular["f1"], popular["yes_ratio"]) == (
        50.0, 0.0, 0.0, 0.0, 0.0)
    assert metrics["mean"]["accuracy"] == pytest.approx(56.25)
    assert metrics["mean"]["f1"] == pytest.approx(100 / 3)
    assert metrics["mean"]["yes_ratio"] == pytest.approx(31.25)
    assert (metrics["num_questions"], metrics["num_answered"], metrics["coverage"]) == (12, 12, 100.0)


def test_pope_folder_and_single_split(pope_files, tmp_path):
    files, predictions = pope_files
    assert score_files("pope", predictions, [str(tmp_path)])["splits"].keys() == {"random", "popular"}
    # one split: the category may be left out
    single = _write_lines(tmp_path / "single.jsonl", [{"question_id": i, "text": "yes"} for i in (1, 2, 3, 4)])
    metrics = score_files("pope", single, [files[1]])
    assert metrics["splits"]["popular"]["accuracy"] == 50.0 and metrics["splits"]["popular"]["recall"] == 100.0


def test_flatten_metrics_for_mlflow():
    flat = flatten_metrics({"task": "vqav2", "accuracy": 50.0, "per_answer_type": {"yes/no": 10, "other": 1.5}},
                           prefix="vqav2/")
    assert flat == {"vqav2/accuracy": 50.0, "vqav2/per_answer_type/yes_no": 10.0, "vqav2/per_answer_type/other": 1.5}
