"""Result files: reading, checking against the questions, writing (each task's format lives in its module).

Shared here: the two EvalAI/LLaVA shapes most tasks use, and the matching of predictions to questions.
- JSON array (`vqa_OpenEnded_mscoco_*_results.json`, GQA's `*_predictions.json`): one array of objects.
- JSON lines (LLaVA's answer files, scored by `llava/eval/eval_pope.py`, `eval_science_qa.py`, ...):
  one object per line; POPE lines name their split in `"category"` (question ids restart in every
  POPE repository file; LLaVA's `llava_pope_test.jsonl` numbers them across the splits instead).

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
    """The task's result file (or folder) name."""
    from components.evaluate.tasks import get_task

    return get_task(task).prediction_file


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
    from components.evaluate.tasks import get_task

    return get_task(task).read(path)


def read_answer_lines(path: str, text_keys: tuple[str, ...], example: str, id_key: str = "question_id",
                      category_key: str | None = None) -> list[Prediction]:
    """JSON lines holding an id and the answer under the first of `text_keys` present (LLaVA's answer files)."""
    if not os.path.isfile(path):
        raise ValueError(f"predictions file {path} does not exist")
    predictions, problems = [], []
    for lineno, record in json_object_lines(path, problems):
        if id_key not in record or not _valid_id(record[id_key]):
            problems.append(f"line {lineno}: missing or invalid {id_key}")
            continue
        key = next((k for k in text_keys if k in record), text_keys[0])
        if not isinstance(record.get(key), str):
            problems.append(f"line {lineno}: {' or '.join(repr(k) for k in text_keys)} must be a string (the answer)")
            continue
        category = record.get(category_key) if category_key else None
        if category is not None and not isinstance(category, str):
            problems.append(f"line {lineno}: {category_key!r} must be a string")
            continue
        predictions.append(Prediction(record[id_key], record[key], category, f"{path}:{lineno}"))
    if problems:
        raise ValueError(f"malformed predictions {path} ({len(problems)} bad line(s)); expected lines like "
                         f"{example}: " + "; ".join(problems[:5]))
    return predictions


def read_answer_array(path: str, id_key: str, text_key: str, what: str) -> list[Prediction]:
    """One JSON array of {id_key, text_key} objects (EvalAI-style result files)."""
    if not os.path.isfile(path):
        raise ValueError(f"predictions file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"predictions file {path} is not valid JSON ({err}); {what} results are one JSON array") \
            from None
    if not isinstance(raw, list):
        raise ValueError(f"predictions file {path} must hold a JSON array of {{{id_key!r}, {text_key!r}}} objects")
    predictions, problems = [], []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            problems.append(f"item {i}: expected an object")
        elif id_key not in item or not _valid_id(item[id_key]):
            problems.append(f"item {i}: missing or invalid {id_key}")
        elif not isinstance(item.get(text_key), str):
            problems.append(f"item {i}: {text_key!r} must be a string")
        else:
            predictions.append(Prediction(item[id_key], item[text_key], None, f"{path}[{i}]"))
    if problems:
        raise ValueError(f"malformed predictions {path} ({len(problems)} bad item(s)): " + "; ".join(problems[:5]))
    return predictions


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
    splits_of_id: dict = {}
    for q in eval_set.questions:
        splits_of_id.setdefault(q.question_id, []).append(q.split)
    for p in predictions:
        if p.category is not None:
            split = p.category
        elif not several:
            split = splits[0]
        elif len(splits_of_id.get(p.question_id, ())) == 1:  # ids numbered across the splits (LLaVA's files)
            split = splits_of_id[p.question_id][0]
        else:
            no_category.append(p.where)
            continue
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
            f"{len(no_category)} prediction(s) have no 'category' ({preview(no_category, 3)}); their ids repeat across "
            f"the splits ({', '.join(splits)}), so every line must name its split"
        )
    if duplicates:
        raise ValueError(f"{len(duplicates)} question id(s) are answered twice: {preview(duplicates, 3)}")
    if unknown:
        shown = [p.question_id if p.category is None else f"{p.category}/{p.question_id}" for p in unknown]
        raise ValueError(
            f"{len(unknown)} prediction(s) name questions that are not in {preview(eval_set.sources, 3)}: "
            f"{preview(shown)}"
            f"{_type_hint([p.question_id for p in unknown], [q.question_id for q in questions.values()])}"
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
    from components.evaluate.tasks import get_task

    get_task(eval_set.task).write(path, eval_set, answers)


def answered(eval_set: EvalSet, answers: dict) -> list[EvalQuestion]:
    return [q for q in eval_set.questions if q.key in answers]


def write_json_lines(path: str, records) -> None:
    """Atomically write one JSON object per line."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def write_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)
