"""Loaders of the official evaluation files, into one question list per task.

Formats (as distributed):
- POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", 2023; the
  RUCAIBox/POPE repository, `output/coco/coco_pope_{random,popular,adversarial}.json`): JSON lines
  `{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in
  the image?", "label": "yes"}`. The split is named by the file; question ids restart in every file.
- VQAv2 (visualqa.org): `v2_OpenEnded_mscoco_{subtype}_questions.json` holds `{"data_subtype":
  "val2014", "questions": [{"image_id", "question", "question_id"}]}`;
  `v2_mscoco_{subtype}_annotations.json` holds `{"annotations": [{"question_id", "image_id",
  "question_type", "answer_type", "answers": [{"answer", ...} x 10]}]}`. Images are
  `COCO_{subtype}_{image_id:012d}.jpg`.
- TextVQA 0.5.1 (textvqa.org): `TextVQA_0.5.1_val.json` holds `{"data": [{"question_id",
  "question", "image_id", "answers": [10 strings], "set_name": "val", ...}]}`; images are
  `{image_id}.jpg` (the val images ship in `train_images/`). The test file has no answers.

Every question becomes an `EvalQuestion`; its `key` is (split, question_id), unique in a set.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

TASKS = ("pope", "vqav2", "textvqa")
POPE_LABELS = ("yes", "no")
POPE_FILE = re.compile(r"^(?:.*_)?pope_(?P<split>[^.]+)\.json$")


@dataclass(frozen=True)
class EvalQuestion:
    """One question with its ground truth (when the files carry it)."""

    question_id: int | str
    question: str
    image: str  # file name inside the image folder
    split: str  # POPE: random|popular|adversarial (from the file name); VQAv2: data_subtype; TextVQA: set_name
    label: str | None = None  # POPE: "yes" or "no"
    answers: tuple[str, ...] = ()  # VQAv2 / TextVQA: the human answers (10 in the official files)
    answer_type: str | None = None  # VQAv2: "yes/no", "number" or "other"
    question_type: str | None = None  # VQAv2: e.g. "what color is the"

    @property
    def key(self) -> tuple[str, int | str]:
        return (self.split, self.question_id)


@dataclass(frozen=True)
class EvalSet:
    """The questions of one task, in file order, and the files they came from."""

    task: str
    questions: tuple[EvalQuestion, ...]
    sources: tuple[str, ...]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(q.split for q in self.questions))

    @property
    def has_ground_truth(self) -> bool:
        if self.task == "pope":
            return True  # the loader requires labels
        return all(q.answers for q in self.questions)

    def limited(self, limit: int | None) -> "EvalSet":
        """The first `limit` questions of every split (all of them when `limit` is None)."""
        if limit is None:
            return self
        taken: dict[str, int] = {}
        kept = []
        for q in self.questions:
            if taken.get(q.split, 0) < limit:
                taken[q.split] = taken.get(q.split, 0) + 1
                kept.append(q)
        return EvalSet(self.task, tuple(kept), self.sources)


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


def preview(items, n: int = 5) -> str:
    """The first `n` items, comma-separated, and how many there are in all (for error messages)."""
    items = list(items)
    text = ", ".join(str(i) for i in items[:n])
    return text + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None


def _question_id(value, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: question_id must be an integer or a string, got {value!r:.60}")
    return value


def _check_unique(questions: list[EvalQuestion], source: str) -> None:
    seen: set = set()
    duplicates = []
    for q in questions:
        if q.key in seen:
            duplicates.append(q.question_id)
        seen.add(q.key)
    if duplicates:
        raise ValueError(f"{source} repeats question ids: {preview(duplicates)}")


# ---------------------------------------------------------------------------------------------- POPE


def pope_split_name(path: str) -> str:
    """`coco_pope_adversarial.json` -> "adversarial" (any `*_pope_<split>.json`; else the file stem)."""
    name = os.path.basename(path)
    match = POPE_FILE.match(name)
    return match.group("split") if match else os.path.splitext(name)[0]


def pope_files(paths: list[str]) -> list[str]:
    """Files as given; a folder stands for its `*pope_*.json` files (sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if POPE_FILE.match(n))
            if not found:
                raise ValueError(f"{path} holds no POPE files (coco_pope_{{random,popular,adversarial}}.json)")
            files.extend(found)
        else:
            files.append(path)
    return files


def load_pope(paths: list[str]) -> EvalSet:
    """POPE question lines with labels, one split per file."""
    files = pope_files(paths)
    if not files:
        raise ValueError("POPE needs at least one coco_pope_<split>.json file")
    questions: list[EvalQuestion] = []
    splits: dict[str, str] = {}
    for path in files:
        split = pope_split_name(path)
        if split in splits:
            raise ValueError(f"two POPE files name the split {split!r}: {splits[split]} and {path}")
        splits[split] = path
        if not os.path.isfile(path):
            raise ValueError(f"POPE file {path} does not exist")
        problems: list[str] = []
        for lineno, record in json_object_lines(path, problems, where=lambda n: f"{path}:{n}"):
            where = f"{path}:{lineno}"
            missing = [k for k in ("question_id", "image", "text", "label") if k not in record]
            if missing:
                problems.append(f"{where}: missing {', '.join(missing)}")
                continue
            if record["label"] not in POPE_LABELS:
                problems.append(f"{where}: label must be 'yes' or 'no', got {record['label']!r:.40}")
                continue
            if not isinstance(record["text"], str) or not isinstance(record["image"], str):
                problems.append(f"{where}: text and image must be strings")
                continue
            try:
                qid = _question_id(record["question_id"], where)
            except ValueError as err:
                problems.append(str(err))
                continue
            questions.append(EvalQuestion(qid, record["text"], record["image"], split, label=record["label"]))
        if problems:
            raise ValueError(f"{len(problems)} bad line(s) in {path}: " + "; ".join(problems[:5]))
    _check_unique(questions, "the POPE files")
    if not questions:
        raise ValueError(f"the POPE files {preview(files)} hold no questions")
    return EvalSet("pope", tuple(questions), tuple(files))


# --------------------------------------------------------------------------------------------- VQAv2


def _vqav2_questions(path: str) -> tuple[str | None, list[dict]]:
    raw = _read_json(path, "VQAv2 questions")
    if not isinstance(raw, dict) or not isinstance(raw.get("questions"), list):
        raise ValueError(f"{path} is not a VQAv2 questions file: expected an object with a 'questions' list")
    return raw.get("data_subtype"), raw["questions"]


def _vqav2_annotations(path: str) -> tuple[str | None, dict]:
    raw = _read_json(path, "VQAv2 annotations")
    if not isinstance(raw, dict) or not isinstance(raw.get("annotations"), list):
        raise ValueError(f"{path} is not a VQAv2 annotations file: expected an object with an 'annotations' list")
    by_id = {}
    for i, ann in enumerate(raw["annotations"]):
        where = f"{path}: annotation {i}"
        if not isinstance(ann, dict) or "question_id" not in ann or not isinstance(ann.get("answers"), list):
            raise ValueError(f"{where}: expected an object with question_id and an answers list")
        answers = []
        for a in ann["answers"]:
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise ValueError(f"{where}: every answer must be an object with a string 'answer'")
            answers.append(a["answer"])
        if not answers:
            raise ValueError(f"{where}: question {ann['question_id']} has no answers")
        qid = _question_id(ann["question_id"], where)
        if qid in by_id:
            raise ValueError(f"{path} repeats question id {qid}")
        by_id[qid] = {**ann, "answers": tuple(answers)}
    return raw.get("data_subtype"), by_id


def load_vqav2(questions_path: str | None, annotations_path: str | None) -> EvalSet:
    """VQAv2 questions joined with their annotations; either file alone also loads.

    Questions alone (test-dev) give an unscored set; annotations alone give a set that can be
    scored but not run (no question text).
    """
    if questions_path is None and annotations_path is None:
        raise ValueError("VQAv2 needs a questions file (--questions), an annotations file (--annotations), or both")
    ann_subtype, annotations = _vqav2_annotations(annotations_path) if annotations_path else (None, None)
    if questions_path is None:
        subtype = ann_subtype or "val2014"
        questions = [
            EvalQuestion(qid, "", f"COCO_{subtype}_{int(a.get('image_id', 0)):012d}.jpg", subtype,
                         answers=a["answers"], answer_type=a.get("answer_type"), question_type=a.get("question_type"))
            for qid, a in annotations.items()
        ]
        return EvalSet("vqav2", tuple(questions), (annotations_path,))

    q_subtype, raw_questions = _vqav2_questions(questions_path)
    subtype = q_subtype or ann_subtype
    if subtype is None:
        raise ValueError(f"{questions_path} has no data_subtype (e.g. 'val2014'): image file names depend on it")
    if q_subtype and ann_subtype and q_subtype != ann_subtype:
        raise ValueError(
            f"mismatched files: {questions_path} is {q_subtype!r} but {annotations_path} is {ann_subtype!r}"
        )
    questions = []
    for i, q in enumerate(raw_questions):
        where = f"{questions_path}: question {i}"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or "image_id" not in q:
            raise ValueError(f"{where}: expected an object with question_id, image_id and a question string")
        qid = _question_id(q.get("question_id"), where)
        try:
            image = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        except (TypeError, ValueError):
            raise ValueError(f"{where}: image_id must be an integer, got {q['image_id']!r:.40}") from None
        ann = annotations.get(qid) if annotations is not None else None
        if ann is not None and "image_id" in ann and ann["image_id"] != q["image_id"]:
            raise ValueError(
                f"mismatched files: question {qid} is about image {q['image_id']} in {questions_path} "
                f"but image {ann['image_id']} in {annotations_path}"
            )
        questions.append(EvalQuestion(
            qid, q["question"], image, subtype,
            answers=ann["answers"] if ann else (),
            answer_type=ann.get("answer_type") if ann else None,
            question_type=ann.get("question_type") if ann else None,
        ))
    _check_unique(questions, questions_path)
    if annotations is not None:
        asked = {q.question_id for q in questions}
        no_annotation = [q.question_id for q in questions if q.question_id not in annotations]
        no_question = [qid for qid in annotations if qid not in asked]
        if no_annotation or no_question:
            parts = []
            if no_annotation:
                parts.append(f"{len(no_annotation)} question(s) have no annotation ({preview(no_annotation)})")
            if no_question:
                parts.append(f"{len(no_question)} annotation(s) have no question ({preview(no_question)})")
            raise ValueError(
                f"mismatched files {questions_path} and {annotations_path}: " + "; ".join(parts)
                + ". Use the questions and annotations of the same split."
            )
    sources = (questions_path,) + ((annotations_path,) if annotations_path else ())
    return EvalSet("vqav2", tuple(questions), sources)


# ------------------------------------------------------------------------------------------- TextVQA


def load_textvqa(path: str) -> EvalSet:
    """TextVQA 0.5.1 questions (with their 10 answers, absent from the test file)."""
    raw = _read_json(path, "TextVQA")
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ValueError(f"{path} is not a TextVQA file: expected an object with a 'data' list")
    questions = []
    for i, item in enumerate(raw["data"]):
        where = f"{path}: item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or "image_id" not in item:
            raise ValueError(f"{where}: expected an object with question_id, image_id and a question string")
        qid = _question_id(item.get("question_id"), where)
        answers = item.get("answers") or ()
        if answers and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where}: answers must be a list of strings")
        if answers and len(answers) != 10:
            raise ValueError(f"{where}: question {qid} has {len(answers)} answers; TextVQA questions have 10")
        split = item.get("set_name") or raw.get("dataset_type") or "val"
        questions.append(EvalQuestion(qid, item["question"], f"{item['image_id']}.jpg", str(split),
                                      answers=tuple(answers)))
    if len({q.split for q in questions}) > 1:
        raise ValueError(f"{path} mixes set names {sorted({q.split for q in questions})}; use one split per file")
    _check_unique(questions, path)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return EvalSet("textvqa", tuple(questions), (path,))


def load_eval_set(task: str, annotations: list[str], questions: str | None = None) -> EvalSet:
    """The files of one task, checked: POPE split files (or a folder of them); VQAv2 questions and/or
    annotations; the TextVQA file."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    annotations = list(annotations or [])
    if task == "pope":
        if questions:
            raise ValueError("POPE files hold questions and labels together: pass them with --annotations only")
        return load_pope(annotations)
    if len(annotations) > 1:
        raise ValueError(f"{task} takes one annotations file, got {len(annotations)}: {preview(annotations)}")
    annotation = annotations[0] if annotations else None
    if task == "vqav2":
        return load_vqav2(questions, annotation)
    if questions:
        raise ValueError("the TextVQA file holds questions and answers together: pass it with --annotations only")
    if annotation is None:
        raise ValueError("TextVQA needs its file (TextVQA_0.5.1_val.json) as --annotations")
    return load_textvqa(annotation)
