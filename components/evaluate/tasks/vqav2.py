"""VQAv2 (Goyal et al. 2017; visualqa.org), scored locally on val and submitted to EvalAI for test-dev.

Files, as published:
- `v2_OpenEnded_mscoco_{subtype}_questions.json`: `{"data_subtype": "val2014", "questions": [{"image_id",
  "question", "question_id"}]}`; `v2_mscoco_{subtype}_annotations.json`: `{"annotations": [{"question_id",
  "image_id", "question_type", "answer_type", "answers": [{"answer", ...} x 10]}]}`. Images are
  `COCO_{subtype}_{image_id:012d}.jpg`.
- LLaVA-1.5's question lines (`llava_vqav2_mscoco_test-dev2015.jsonl`, `scripts/v1_5/eval/vqav2.sh`):
  `{"question_id", "image", "text", "category"}`; `text` already ends with the short-answer line and is
  the prompt as written. The split is named by the file (`test-dev2015`).

Result files:
- `vqav2_predictions.json`: the EvalAI result format `[{"question_id", "answer"}]` with the model's answers.
- test-dev (no annotations): `vqav2_<split>_submission.json`, written as LLaVA's
  `scripts/convert_vqav2_for_submission.py`: answers through the EvalAI answer processor
  (`answer_processing.normalize_answer`), one entry for every question of the full test2015 list
  (`--test-questions`: `llava_vqav2_mscoco_test2015.jsonl` or `v2_OpenEnded_mscoco_test2015_questions.json`),
  an empty answer for those not asked. EvalAI's test-dev phase requires the whole list.
Scoring (val): `components.evaluate.scoring.vqav2_accuracy`, overall and per answer type.
"""

from __future__ import annotations

import os
import re

from components.evaluate.answer_processing import normalize_answer
from components.evaluate.datasets import (
    EvalFiles,
    EvalQuestion,
    EvalSet,
    check_unique,
    preview,
    question_id,
    read_json,
    read_json_lines,
)
from components.evaluate.predictions import answered, read_vqa_predictions, write_json
from components.evaluate.prompts import strip_short_answer
from components.evaluate.scoring import score_vqa
from components.evaluate.tasks.base import Task, refuse

LLAVA_FILE = re.compile(r"^llava_vqav2_mscoco_(?P<split>.+)\.jsonl$")
COCO_IMAGE = re.compile(r"^COCO_(?P<subtype>[a-z\-]+\d{4})_\d+\.\w+$")


def _vqav2_questions(path: str) -> tuple[str | None, list[dict]]:
    raw = read_json(path, "VQAv2 questions")
    if not isinstance(raw, dict) or not isinstance(raw.get("questions"), list):
        raise ValueError(f"{path} is not a VQAv2 questions file: expected an object with a 'questions' list")
    return raw.get("data_subtype"), raw["questions"]


def _vqav2_annotations(path: str) -> tuple[str | None, dict]:
    raw = read_json(path, "VQAv2 annotations")
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
        qid = question_id(ann["question_id"], where)
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
        qid = question_id(q.get("question_id"), where)
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
    check_unique(questions, questions_path)
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


def llava_split(path: str, records: list) -> str:
    """`llava_vqav2_mscoco_test-dev2015.jsonl` -> "test-dev2015"; else the COCO subtype of the first image."""
    match = LLAVA_FILE.match(os.path.basename(path))
    if match:
        return match.group("split")
    image = COCO_IMAGE.match(os.path.basename(str(records[0][1].get("image", ""))))
    return image.group("subtype") if image else "test-dev2015"


def load_llava_vqav2(path: str, annotations_path: str | None) -> EvalSet:
    records = read_json_lines(path, "LLaVA VQAv2 questions", ("question_id", "image", "text"))
    split = llava_split(path, records)
    annotations = _vqav2_annotations(annotations_path)[1] if annotations_path else None
    questions = []
    for where, record in records:
        qid = question_id(record["question_id"], where)
        ann = annotations.get(qid) if annotations is not None else None
        if annotations is not None and ann is None:
            raise ValueError(f"mismatched files {path} and {annotations_path}: question {qid} has no annotation")
        questions.append(EvalQuestion(
            qid, strip_short_answer(str(record["text"])), str(record["image"]), split, prompt=str(record["text"]),
            answers=ann["answers"] if ann else (), answer_type=ann.get("answer_type") if ann else None,
            question_type=ann.get("question_type") if ann else None))
    check_unique(questions, path)
    return EvalSet("vqav2", tuple(questions), (path,) + ((annotations_path,) if annotations_path else ()))


def full_test_ids(path: str) -> list:
    """Every question id of a full test list (LLaVA's jsonl or the official questions JSON), in file order."""
    if path.endswith(".jsonl"):
        return [question_id(r["question_id"], where)
                for where, r in read_json_lines(path, "VQAv2 test questions", ("question_id",))]
    _, raw = _vqav2_questions(path)
    return [question_id(q.get("question_id") if isinstance(q, dict) else None, f"{path}: question {i}")
            for i, q in enumerate(raw)]


def check_files(files: EvalFiles) -> None:
    refuse(files, "VQAv2", {"annotations", "questions", "test_questions"})
    if not files.questions and not files.annotations:
        raise ValueError("VQAv2 needs a questions file (--questions), an annotations file (--annotations), or both")
    if len(files.annotations) > 1:
        raise ValueError(f"vqav2 takes one annotations file, got {len(files.annotations)}: "
                         f"{preview(files.annotations)}")


def load(files: EvalFiles, for_run: bool = False) -> EvalSet:
    annotation = files.annotations[0] if files.annotations else None
    if files.questions and files.questions.endswith(".jsonl"):
        eval_set = load_llava_vqav2(files.questions, annotation)
    else:
        eval_set = load_vqav2(files.questions, annotation)
    if for_run and not eval_set.has_ground_truth and not files.test_questions:
        raise ValueError(
            f"{eval_set.splits[0]} has no answers, so the run writes an EvalAI submission, and EvalAI wants every "
            f"test2015 question id in it: pass the full list with --test-questions (llava_vqav2_mscoco_test2015.jsonl "
            f"or v2_OpenEnded_mscoco_test2015_questions.json)")
    if files.test_questions:
        full = set(full_test_ids(files.test_questions))
        outside = [q.question_id for q in eval_set.questions if q.question_id not in full]
        if outside:
            raise ValueError(f"mismatched files: {len(outside)} question(s) of {preview(eval_set.sources, 2)} are not "
                             f"in the test list {files.test_questions} ({preview(outside)})")
    return eval_set


def write(path: str, eval_set: EvalSet, answers: dict) -> None:
    write_json(path, [{"question_id": q.question_id, "answer": answers[q.key]} for q in answered(eval_set, answers)])


def write_submission(path: str, eval_set: EvalSet, answers: dict, test_questions: str) -> int:
    """convert_vqav2_for_submission.py: normalised answers for every test question, "" for those not asked."""
    by_id = {q.question_id: answers[q.key] for q in answered(eval_set, answers)}
    ids = full_test_ids(test_questions)
    write_json(path, [{"question_id": qid, "answer": normalize_answer(by_id[qid]) if qid in by_id else ""}
                      for qid in ids])
    return len(ids)


def extra_outputs(out_dir: str, eval_set: EvalSet, answers: dict, files: EvalFiles) -> dict[str, str]:
    if eval_set.has_ground_truth or not files.test_questions:
        return {}
    path = os.path.join(out_dir, f"vqav2_{eval_set.splits[0]}_submission.json")
    write_submission(path, eval_set, answers, files.test_questions)
    return {"submission": path}


TASK = Task(
    name="vqav2",
    title="VQAv2 (val scored here, test-dev as an EvalAI submission)",
    files="--questions v2_OpenEnded_mscoco_<subtype>_questions.json or llava_vqav2_mscoco_test-dev2015.jsonl; "
          "--annotations v2_mscoco_<subtype>_annotations.json (val); --test-questions the full test2015 list "
          "(test-dev submissions)",
    images="COCO val2014 / test2015",
    check_files=check_files,
    load=load,
    prediction_file="vqav2_predictions.json",
    write=write,
    read=read_vqa_predictions,
    score=score_vqa,
    headline=("accuracy",),
    extra_outputs=extra_outputs,
)
