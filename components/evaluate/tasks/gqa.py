"""GQA (Hudson & Manning 2019), testdev-balanced, as LLaVA-1.5 evaluates it.

Files, as published (cs.stanford.edu/people/dorarad/gqa):
- `testdev_balanced_questions.json`: one object keyed by question id, `{"20968125": {"imageId": "n161313",
  "question": "Is it overcast?", "answer": "no", "fullAnswer": ..., "isBalanced": true, "types":
  {"structural": "verify", "semantic": "global", "detailed": ...}, "semantic": [...], ...}}`; images
  `images/{imageId}.jpg`. Given as `--annotations` (it holds the answers) or `--questions`.
- LLaVA's `llava_gqa_testdev_balanced.jsonl` (`scripts/v1_5/eval/gqa.sh`), optional `--questions`:
  `{"question_id", "image", "text"}`, `text` being the prompt as written.
The prompt is the short-answer prompt.

Result file `testdev_balanced_predictions.json`: `[{"questionId", "prediction"}]`, each prediction as
LLaVA's `scripts/convert_gqa_for_eval.py` writes it (trailing periods stripped, lower-cased). Scoring
follows GQA's `eval.py`: over the balanced questions, a prediction is right when it equals the answer
exactly; accuracy overall, for binary questions (structural type verify/logical/compare/choose, i.e.
not "query") and open ones ("query"), and per structural and semantic type.
"""

from __future__ import annotations

import os
import re

from components.evaluate.datasets import (
    EvalFiles,
    EvalQuestion,
    EvalSet,
    preview,
    question_id,
    read_json,
    read_json_lines,
)
from components.evaluate.predictions import Matched, answered, read_answer_array, write_json
from components.evaluate.scoring import percent
from components.evaluate.tasks.base import Task, refuse

TIER_FILE = re.compile(r"^(?P<tier>.+)_questions\.json$")


def normalize_prediction(text: str) -> str:
    """convert_gqa_for_eval.py: `text.rstrip('.').lower()`."""
    return text.rstrip(".").lower()


def load_questions(path: str) -> list[EvalQuestion]:
    raw = read_json(path, "GQA questions")
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{path} is not a GQA questions file: expected an object of question id -> question")
    match = TIER_FILE.match(os.path.basename(path))
    tier = match.group("tier") if match else "testdev_balanced"
    questions, problems = [], []
    for qid, q in raw.items():
        missing = [k for k in ("imageId", "question", "answer") if not isinstance(q.get(k), str)]
        if missing:
            problems.append(f"question {qid}: missing or non-string {', '.join(missing)}")
            continue
        types = q.get("types") if isinstance(q.get("types"), dict) else {}
        questions.append(EvalQuestion(
            question_id(qid, path), q["question"], f"{q['imageId']}.jpg", tier, answers=(q["answer"],),
            question_type=types.get("structural"),
            info={"semantic": types.get("semantic"), "balanced": q.get("isBalanced", True) is not False}))
    if problems:
        raise ValueError(f"{len(problems)} bad question(s) in {path}: " + "; ".join(problems[:5]))
    return questions


def llava_prompts(path: str, questions: list[EvalQuestion]) -> dict:
    known = {str(q.question_id) for q in questions}
    prompts = {str(r["question_id"]): str(r["text"])
               for _, r in read_json_lines(path, "LLaVA GQA questions", ("question_id", "text"))}
    unknown = [k for k in prompts if k not in known]
    missing = [k for k in known if k not in prompts]
    if unknown or missing:
        raise ValueError(f"mismatched GQA files: {path} asks {len(unknown)} question(s) the questions file lacks "
                         f"({preview(unknown)}) and lacks {len(missing)} ({preview(missing)})")
    return prompts


def check_files(files: EvalFiles) -> None:
    refuse(files, "GQA", {"annotations", "questions"})
    jsons = [p for p in (*files.annotations, files.questions) if p and not p.endswith(".jsonl")]
    if len(jsons) != 1:
        raise ValueError("GQA needs its questions file (testdev_balanced_questions.json, which holds the answers) as "
                         f"--annotations, optionally LLaVA's llava_gqa_testdev_balanced.jsonl as --questions; "
                         f"got {preview(jsons) or 'none'}")


def load(files: EvalFiles, for_run: bool = False) -> EvalSet:
    path = next(p for p in (*files.annotations, files.questions) if p and not p.endswith(".jsonl"))
    questions = load_questions(path)
    sources = (path,)
    if files.questions and files.questions.endswith(".jsonl"):
        prompts = llava_prompts(files.questions, questions)
        questions = [EvalQuestion(q.question_id, q.question, q.image, q.split, answers=q.answers,
                                  question_type=q.question_type, info=q.info, prompt=prompts[str(q.question_id)])
                     for q in questions]
        sources += (files.questions,)
    return EvalSet("gqa", tuple(questions), sources)


def write(path: str, eval_set: EvalSet, answers: dict) -> None:
    write_json(path, [{"questionId": q.question_id, "prediction": normalize_prediction(answers[q.key])}
                      for q in answered(eval_set, answers)])


def read(path: str):
    return read_answer_array(path, "questionId", "prediction", "GQA")


def score(eval_set: EvalSet, matched: Matched) -> dict:
    """GQA eval.py's accuracy, binary/open split and per-type accuracies, over the balanced questions."""
    hits: dict[str, list[int]] = {"accuracy": [], "binary": [], "open": []}
    structural: dict[str, list[int]] = {}
    semantic: dict[str, list[int]] = {}
    for q in eval_set.questions:
        if q.key not in matched.answers or not q.info.get("balanced", True):
            continue
        hit = int(matched.answers[q.key] == q.answers[0])
        hits["accuracy"].append(hit)
        hits["open" if q.question_type == "query" else "binary"].append(hit)
        structural.setdefault(str(q.question_type), []).append(hit)
        semantic.setdefault(str(q.info.get("semantic")), []).append(hit)
    result = {name: percent(sum(v), len(v)) for name, v in hits.items()}
    result["per_structural_type"] = {t: percent(sum(v), len(v)) for t, v in sorted(structural.items())}
    result["per_semantic_type"] = {t: percent(sum(v), len(v)) for t, v in sorted(semantic.items())}
    result["num_balanced"] = len(hits["accuracy"])
    return result


TASK = Task(
    name="gqa",
    title="GQA testdev-balanced (exact match)",
    files="--annotations testdev_balanced_questions.json; --questions llava_gqa_testdev_balanced.jsonl (optional)",
    images="GQA images/",
    check_files=check_files,
    load=load,
    prediction_file="testdev_balanced_predictions.json",
    write=write,
    read=read,
    score=score,
    headline=("accuracy",),
)
