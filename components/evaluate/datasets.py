"""Evaluation questions: the types every task loads into, the helpers its loader shares, and
`load_eval_set`, which hands a task's files to that task's loader (`components.evaluate.tasks`).

Every question of every task becomes an `EvalQuestion`; its `key` is (split, question_id), unique in
a set. The loaders and the published layouts they read are documented in their task modules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from components.evaluate.prompts import short_answer_prompt

POPE_LABELS = ("yes", "no")


@dataclass(frozen=True)
class EvalQuestion:
    """One question with its ground truth (when the files carry it) and the prompt the model gets."""

    question_id: int | str
    question: str
    image: str  # file name (or path) inside the image folder; "" when the image is embedded (`image_data`)
    split: str  # POPE: random|popular|adversarial; VQAv2: data_subtype; MME: subtask; others: the set's split
    label: str | None = None  # POPE: "yes" or "no"
    answers: tuple[str, ...] = ()  # VQAv2 / TextVQA: 10 human answers; GQA: the answer; MME: Yes/No; MC: the letter
    answer_type: str | None = None  # VQAv2: "yes/no", "number" or "other"
    question_type: str | None = None  # VQAv2: e.g. "what color is the"; SEED-Bench: the evaluation dimension
    prompt: str = ""  # the text the model reads after the image; default: the short-answer prompt
    choices: tuple[str, ...] = ()  # multiple choice: the options in the order shown (A, B, ...)
    group: int | str | None = None  # MME: the image (two questions); MMBench: the circular group (index % 1e6)
    image_data: str | None = None  # base64 image (MMBench's TSV embeds its images)
    info: dict = field(default_factory=dict, compare=False)  # task-specific fields (GQA types, MMBench category)

    def __post_init__(self):
        if not self.prompt and self.question:
            object.__setattr__(self, "prompt", short_answer_prompt(self.question))

    @property
    def key(self) -> tuple[str, int | str]:
        return (self.split, self.question_id)


@dataclass(frozen=True)
class EvalSet:
    """The questions of one task, in file order, and the files they came from.

    protocol: the prompt protocol when a task has several (TextVQA: "llava-1.5-ocr" or "no-ocr").
    notes: what the loader left out and why (e.g. ScienceQA's text-only questions), for the summary.
    """

    task: str
    questions: tuple[EvalQuestion, ...]
    sources: tuple[str, ...]
    protocol: str | None = None
    notes: dict = field(default_factory=dict, compare=False)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(q.split for q in self.questions))

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.questions) and all(q.label is not None or q.answers for q in self.questions)

    def limited(self, limit: int | None) -> "EvalSet":
        """The first `limit` questions of every split (all of them when `limit` is None). Grouped questions
        (an MME image's pair, an MMBench circular group) count as one and stay together."""
        if limit is None:
            return self
        taken: dict[str, set] = {}
        kept = []
        for q in self.questions:
            unit = ("question", q.question_id) if q.group is None else ("group", q.group)
            units = taken.setdefault(q.split, set())
            if unit in units or len(units) < limit:
                units.add(unit)
                kept.append(q)
        return EvalSet(self.task, tuple(kept), self.sources, self.protocol, self.notes)


@dataclass(frozen=True)
class EvalFiles:
    """The files (and prompt protocol) that name one task's questions; which ones a task takes is checked by
    the task (`Task.check_files`)."""

    annotations: tuple[str, ...] = ()
    questions: str | None = None
    ocr: str | None = None
    test_questions: str | None = None
    protocol: str | None = None

    def given(self) -> list[str]:
        """The flag names of the files given (for messages)."""
        names = {"annotations": "--annotations", "questions": "--questions", "ocr": "--ocr",
                 "test_questions": "--test-questions", "protocol": "--protocol"}
        return [flag for name, flag in names.items() if getattr(self, name)]


# -------------------------------------------------------------------------------------------- helpers


def json_object_lines(path: str, problems: list[str], where=lambda lineno: f"line {lineno}"):
    """(line number, object) for every JSON-object line of a JSON-lines file; a blank line is skipped,
    any other line is added to `problems` (named by `where(lineno)`)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where(lineno)}: not valid JSON ({err.msg})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{where(lineno)}: expected a JSON object, got {type(record).__name__}")
                continue
            yield lineno, record


def read_json_lines(path: str, what: str, required: tuple[str, ...]) -> list[tuple[str, dict]]:
    """("file:line", object) of a JSON-lines file whose every line must hold the `required` keys; all bad
    lines are reported in one ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {path} does not exist")
    problems: list[str] = []
    records = []
    for lineno, record in json_object_lines(path, problems, where=lambda n: f"{path}:{n}"):
        missing = [k for k in required if k not in record]
        if missing:
            problems.append(f"{path}:{lineno}: missing {', '.join(missing)}")
            continue
        records.append((f"{path}:{lineno}", record))
    if problems:
        raise ValueError(f"{len(problems)} bad line(s) in {what} file {path}: " + "; ".join(problems[:5]))
    if not records:
        raise ValueError(f"{what} file {path} holds no questions")
    return records


def preview(items, n: int = 5) -> str:
    """The first `n` items, comma-separated, and how many there are in all (for error messages)."""
    items = list(items)
    text = ", ".join(str(i) for i in items[:n])
    return text + (f", ... ({len(items)} in all)" if len(items) > n else "")


def read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None


def question_id(value, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: question_id must be an integer or a string, got {value!r:.60}")
    return value


def check_unique(questions: list[EvalQuestion], source: str) -> None:
    seen: set = set()
    duplicates = []
    for q in questions:
        if q.key in seen:
            duplicates.append(q.question_id)
        seen.add(q.key)
    if duplicates:
        raise ValueError(f"{source} repeats question ids: {preview(duplicates)}")


def one_file(files: EvalFiles, task: str, what: str) -> str:
    """The single annotations file a task takes (named `what` in messages)."""
    if len(files.annotations) != 1:
        got = f"got {len(files.annotations)}: {preview(files.annotations)}" if files.annotations else "got none"
        raise ValueError(f"{task} takes one annotations file ({what}), {got}")
    return files.annotations[0]


def load_eval_set(task: str, annotations: list[str], questions: str | None = None, *, ocr: str | None = None,
                  test_questions: str | None = None, protocol: str | None = None, for_run: bool = False) -> EvalSet:
    """The files of one task, checked by that task's loader. `for_run`: the set is to be answered by a model
    (prompts and submission inputs must be complete), not only scored."""
    from components.evaluate.tasks import get_task

    spec = get_task(task)
    files = EvalFiles(tuple(annotations or ()), questions, ocr, test_questions, protocol)
    spec.check_files(files)
    return spec.load(files, for_run)
