"""Result files in the official formats: read, check against the questions, write.

- VQAv2 / TextVQA (the EvalAI submission format, `vqa_OpenEnded_mscoco_*_results.json`): one JSON
  array `[{"question_id": 262148000, "answer": "down"}, ...]`.
- POPE (LLaVA's answer files, scored by `llava/eval/eval_pope.py`): JSON lines
  `{"question_id": 1, "text": "Yes, there is a dog."}`; other keys are ignored. POPE question ids
  restart in every split file, so with several splits every line names its split in `"category"`
  (as LLaVA's `llava_pope_test.jsonl` does).

`match_predictions` refuses, naming them: malformed entries, duplicated question ids, ids (or
categories) the questions do not have, and questions without a prediction, unless partial
scoring is allowed; then it reports the coverage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from components.evaluate.datasets import EvalQuestion, EvalSet, json_object_lines, preview


@dataclass(frozen=True)
class Prediction:
    question_id: int | str
    text: str
    category: str | None  # POPE split, when given
    where: str  # "file:line" or "file[item]", for messages


@dataclass(frozen=True)
class Matched:
    """Predictions matched to questions: the answer text by question key, and the coverage."""

    answers: dict
    num_questions: int
    missing: tuple  # keys of questions without a prediction

    @property
    def num_answered(self) -> int:
        return len(self.answers)

    @property
    def coverage(self) -> float:
        return self.num_answered / self.num_questions


def prediction_filename(task: str) -> str:
    return f"{task}_predictions.jsonl" if task == "pope" else f"{task}_predictions.json"


def _valid_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def read_pope_predictions(path: str) -> list[Prediction]:
    """JSON lines with question_id, text and (optional) category."""
    if not os.path.isfile(path):
        raise ValueError(f"predictions file {path} does not exist")
    predictions, problems = [], []
    for lineno, record in json_object_lines(path, problems):
        where = f"{path}:{lineno}"
        if "question_id" not in record or not _valid_id(record["question_id"]):
            problems.append(f"line {lineno}: missing or invalid question_id")
            continue
        if not isinstance(record.get("text"), str):
            problems.append(f"line {lineno}: 'text' must be a string (the model's answer)")
            continue
        category = record.get("category")
        if category is not None and not isinstance(category, str):
            problems.append(f"line {lineno}: 'category' must be a string (the POPE split)")
            continue
        predictions.append(Prediction(record["question_id"], record["text"], category, where))
    if problems:
        raise ValueError(
            f"malformed POPE predictions {path} ({len(problems)} bad line(s)); "
            f"expected lines like {{\"question_id\": 1, \"text\": \"yes\"}}: " + "; ".join(problems[:5])
        )
    return predictions


def read_vqa_predictions(path: str) -> list[Prediction]:
    """One JSON array of {"question_id", "answer"} objects."""
    if not os.path.isfile(path):
        raise ValueError(f"predictions file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        first = text.lstrip().split("\n", 1)[0]
        hint = ""
        try:
            if isinstance(json.loads(first), dict):
                hint = " It looks like JSON lines; VQAv2/TextVQA results are one JSON array."
        except json.JSONDecodeError:
            pass
        raise ValueError(f"predictions file {path} is not valid JSON ({err}).{hint}") from None
    if not isinstance(raw, list):
        raise ValueError(f"predictions file {path} must hold a JSON array of {{\"question_id\", \"answer\"}} objects")
    predictions, problems = [], []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            problems.append(f"item {i}: expected an object")
        elif "question_id" not in item or not _valid_id(item["question_id"]):
            problems.append(f"item {i}: missing or invalid question_id")
        elif not isinstance(item.get("answer"), str):
            problems.append(f"item {i}: 'answer' must be a string")
        else:
            predictions.append(Prediction(item["question_id"], item["answer"], None, f"{path}[{i}]"))
    if problems:
        raise ValueError(f"malformed predictions {path} ({len(problems)} bad item(s)): " + "; ".join(problems[:5]))
    return predictions


def read_predictions(task: str, path: str) -> list[Prediction]:
    return read_pope_predictions(path) if task == "pope" else read_vqa_predictions(path)


def _type_hint(unknown_ids, known_ids) -> str:
    as_text = {str(k) for k in known_ids}
    if any(str(u) in as_text for u in unknown_ids):
        kinds = sorted({type(k).__name__ for k in known_ids})
        return f" (the questions' ids are of type {'/'.join(kinds)}: check the type of question_id)"
    return ""


def match_predictions(eval_set: EvalSet, predictions: list[Prediction], allow_partial: bool = False) -> Matched:
    """Predictions keyed like the questions; every problem is a ValueError naming the ids."""
    questions = {q.key: q for q in eval_set.questions}
    splits = eval_set.splits
    several = len(splits) > 1
    answers: dict = {}
    first_seen: dict = {}
    duplicates, unknown, no_category = [], [], []
    for p in predictions:
        if p.category is not None:
            split = p.category
        elif several:
            no_category.append(p.where)
            continue
        else:
            split = splits[0]
        key = (split, p.question_id)
        if key not in questions:
            unknown.append(p)
            continue
        if key in answers:
            duplicates.append(f"{p.question_id} ({first_seen[key]} and {p.where})")
            continue
        answers[key] = p.text
        first_seen[key] = p.where
    if no_category:
        raise ValueError(
            f"{len(no_category)} prediction(s) have no 'category' ({preview(no_category, 3)}); with several POPE "
            f"splits ({', '.join(splits)}) every line must name its split"
        )
    if duplicates:
        raise ValueError(f"{len(duplicates)} question id(s) are answered twice: {preview(duplicates, 3)}")
    if unknown:
        shown = [p.question_id if (not several and p.category is None) else f"{p.category}/{p.question_id}"
                 for p in unknown]
        raise ValueError(
            f"{len(unknown)} prediction(s) name questions that are not in {preview(eval_set.sources, 3)}: "
            f"{preview(shown)}{_type_hint([p.question_id for p in unknown], [q.question_id for q in questions.values()])}"
            f"; are the predictions and annotations of the same split?"
        )
    missing = tuple(k for k in questions if k not in answers)
    if not answers:
        raise ValueError(
            f"no prediction matches a question of {preview(eval_set.sources, 3)} ({len(predictions)} predictions read)"
        )
    if missing and not allow_partial:
        shown = [k[1] if not several else f"{k[0]}/{k[1]}" for k in missing]
        raise ValueError(
            f"the predictions answer {len(answers)} of {len(questions)} questions; missing question ids: "
            f"{preview(shown)}. Pass --allow-partial to score the answered ones."
        )
    return Matched(answers=answers, num_questions=len(questions), missing=missing)


def write_predictions(path: str, eval_set: EvalSet, answers: dict) -> None:
    """Write answers (by question key) in the task's official result format, in question order."""
    questions: list[EvalQuestion] = [q for q in eval_set.questions if q.key in answers]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if eval_set.task == "pope":
            for q in questions:
                record = {"question_id": q.question_id, "question": q.question, "text": answers[q.key],
                          "category": q.split}
                f.write(json.dumps(record) + "\n")
        else:
            json.dump([{"question_id": q.question_id, "answer": answers[q.key]} for q in questions], f)
    os.replace(tmp, path)
