"""POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", 2023).

Files, as published:
- the POPE repository (RUCAIBox/POPE, `output/coco/coco_pope_{random,popular,adversarial}.json`):
  JSON lines `{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a
  snowboard in the image?", "label": "yes"}`; the split is named by the file, ids restart in every file.
  The prompt is the short-answer prompt built on `text`.
- LLaVA-1.5's `llava_pope_test.jsonl` (`scripts/v1_5/eval/pope.sh`): question lines `{"question_id",
  "image", "text", "category"}` with ids numbered across the splits and no labels; the prompt is `text`
  as written. `llava/eval/eval_pope.py` pairs the k-th question of a category with the k-th line of
  `coco_pope_<category>.json`; so does this loader, and it checks that image and question agree.
  Without the POPE files the set can be run (answers written) but not scored.

Result file: JSON lines `{"question_id", "question", "text", "category"}`, scored as eval_pope.py
(`components.evaluate.scoring.pope_answer` / `pope_metrics`), per split and averaged.
"""

from __future__ import annotations

import os
import re

from components.evaluate.datasets import (
    POPE_LABELS,
    EvalFiles,
    EvalQuestion,
    EvalSet,
    check_unique,
    json_object_lines,
    preview,
    question_id,
    read_json_lines,
)
from components.evaluate.predictions import answered, read_pope_predictions, write_json_lines
from components.evaluate.prompts import strip_short_answer
from components.evaluate.scoring import score_pope
from components.evaluate.tasks.base import Task, refuse

POPE_FILE = re.compile(r"^(?:.*_)?pope_(?P<split>[^.]+)\.json$")


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
                qid = question_id(record["question_id"], where)
            except ValueError as err:
                problems.append(str(err))
                continue
            questions.append(EvalQuestion(qid, record["text"], record["image"], split, label=record["label"]))
        if problems:
            raise ValueError(f"{len(problems)} bad line(s) in {path}: " + "; ".join(problems[:5]))
    check_unique(questions, "the POPE files")
    if not questions:
        raise ValueError(f"the POPE files {preview(files)} hold no questions")
    return EvalSet("pope", tuple(questions), tuple(files))


def load_llava_pope(path: str, labelled: EvalSet | None) -> EvalSet:
    """LLaVA's question lines; labels from the POPE files, matched by position within each category."""
    records = read_json_lines(path, "LLaVA POPE questions", ("question_id", "image", "text", "category"))
    by_split: dict[str, list] = {}
    if labelled is not None:
        for q in labelled.questions:
            by_split.setdefault(q.split, []).append(q)
    seen: dict[str, int] = {}
    questions, problems = [], []
    for where, record in records:
        split = str(record["category"])
        k = seen.get(split, 0)
        seen[split] = k + 1
        qid = question_id(record["question_id"], where)
        text = str(record["text"])
        label = None
        if labelled is not None:
            truth = by_split.get(split, [])
            if k >= len(truth):
                problems.append(f"{where}: category {split!r} has more questions than "
                                f"{'its POPE file' if truth else 'the POPE files have (no file names it)'}")
                continue
            if truth[k].image != record["image"] or truth[k].question != strip_short_answer(text):
                problems.append(f"{where}: question {k + 1} of {split!r} is {record['image']} {text!r:.60} but the "
                                f"POPE file has {truth[k].image} {truth[k].question!r:.60}")
                continue
            label = truth[k].label
        questions.append(EvalQuestion(qid, strip_short_answer(text), str(record["image"]), split, label=label,
                                      prompt=text))
    if labelled is not None:
        short = [f"{s} ({seen.get(s, 0)} of {len(v)})" for s, v in by_split.items() if seen.get(s, 0) != len(v)]
        if short:
            problems.append(f"the POPE files hold questions {path} does not ask: {', '.join(short)}")
    if problems:
        raise ValueError(f"mismatched POPE files: " + "; ".join(problems[:5]))
    check_unique(questions, path)
    sources = (path,) + (labelled.sources if labelled else ())
    return EvalSet("pope", tuple(questions), sources)


def check_files(files: EvalFiles) -> None:
    refuse(files, "POPE", {"annotations", "questions"})
    if not files.annotations and not files.questions:
        raise ValueError("POPE needs its coco_pope_<split>.json files (or their folder) as --annotations, and/or "
                         "LLaVA's llava_pope_test.jsonl as --questions")


def load(files: EvalFiles, for_run: bool = False) -> EvalSet:
    labelled = load_pope(list(files.annotations)) if files.annotations else None
    if files.questions:
        return load_llava_pope(files.questions, labelled)
    return labelled


def write(path: str, eval_set: EvalSet, answers: dict) -> None:
    write_json_lines(path, ({"question_id": q.question_id, "question": q.question, "text": answers[q.key],
                             "category": q.split} for q in answered(eval_set, answers)))


TASK = Task(
    name="pope",
    title="POPE (object hallucination, yes/no)",
    files="--annotations coco_pope_{random,popular,adversarial}.json (or their folder); "
          "--questions llava_pope_test.jsonl (LLaVA's prompts, labels from the POPE files)",
    images="COCO val2014",
    check_files=check_files,
    load=load,
    prediction_file="pope_predictions.jsonl",
    write=write,
    read=read_pope_predictions,
    score=score_pope,
    headline=("mean.accuracy", "mean.f1"),
)
