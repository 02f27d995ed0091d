"""SEED-Bench (Li et al. 2023; AILab-CVC/SEED-Bench), the image part (evaluation dimensions 1-9).

Files, as published (SEED-Bench-1, `DATASET.md`): `SEED-Bench.json` holds `{"questions": [{"answer": "A",
"choice_a", "choice_b", "choice_c", "choice_d", "data_id": "1454426_2591111986", "data_type":
"image", "question", "question_id": "101669", "question_type_id": 5}, ...], "question_type":
{"Scene Understanding": 1, ...}}`; the images are `SEED-Bench-image/<data_id>`. Video questions
(`data_type` "video") are left out (counted in the summary). The image file is named `data_id` exactly
(SEED-Bench's `eval.py`: `os.path.join(cc3m_dir, data_id)`).

Prompt: the question, `A. ...` to `D. ...`, "Answer with the option's letter from the given choices
directly." (LLaVA's `llava-seed-bench.jsonl`). Result file: the leaderboard's lines `{"question_id",
"prediction"}` (LLaVA's `scripts/convert_seed_for_submission.py`). A prediction is right when the first
letter of the stripped reply equals the answer exactly; accuracy per question type and overall.
"""

from __future__ import annotations

from components.evaluate.datasets import (
    EvalFiles,
    EvalQuestion,
    EvalSet,
    check_unique,
    one_file,
    question_id,
    read_json,
)
from components.evaluate.predictions import Matched, answered, read_answer_lines, write_json_lines
from components.evaluate.prompts import multiple_choice_prompt
from components.evaluate.scoring import percent
from components.evaluate.tasks.base import Task, refuse

CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")


def first_letter(text: str) -> str:
    text = text.strip()
    return text[0] if text else ""


def check_files(files: EvalFiles) -> None:
    refuse(files, "SEED-Bench", {"annotations"})
    if not files.annotations:
        raise ValueError("SEED-Bench needs SEED-Bench.json as --annotations")
    one_file(files, "seed", "SEED-Bench.json")


def load(files: EvalFiles, for_run: bool = False) -> EvalSet:
    path = files.annotations[0]
    raw = read_json(path, "SEED-Bench")
    if not isinstance(raw, dict) or not isinstance(raw.get("questions"), list) or not isinstance(
            raw.get("question_type"), dict):
        raise ValueError(f"{path} is not a SEED-Bench file: expected an object with 'questions' and 'question_type'")
    type_names = {v: k for k, v in raw["question_type"].items()}
    questions, problems, videos = [], [], 0
    for i, q in enumerate(raw["questions"]):
        where = f"{path}: question {i}"
        if not isinstance(q, dict):
            problems.append(f"{where}: expected an object")
            continue
        if q.get("data_type") != "image":
            videos += 1
            continue
        missing = [k for k in ("question", "data_id", "answer", *CHOICE_KEYS) if not isinstance(q.get(k), str)]
        if missing or q.get("question_type_id") not in type_names:
            problems.append(f"{where}: " + (f"missing {', '.join(missing)}" if missing else
                                            f"question_type_id {q.get('question_type_id')!r} is not in question_type"))
            continue
        choices = [q[k] for k in CHOICE_KEYS]
        questions.append(EvalQuestion(
            question_id(q.get("question_id"), where), q["question"], q["data_id"], "image",
            answers=(q["answer"],), choices=tuple(choices), question_type=type_names[q["question_type_id"]],
            prompt=multiple_choice_prompt(q["question"], choices)))
    if problems:
        raise ValueError(f"{len(problems)} bad question(s) in {path}: " + "; ".join(problems[:5]))
    if not questions:
        raise ValueError(f"{path} holds no image questions")
    check_unique(questions, path)
    return EvalSet("seed", tuple(questions), (path,), notes={"video_questions_left_out": videos})


def write(path: str, eval_set: EvalSet, answers: dict) -> None:
    write_json_lines(path, ({"question_id": q.question_id, "prediction": answers[q.key]}
                            for q in answered(eval_set, answers)))


def read(path: str):
    return read_answer_lines(path, ("prediction", "text"), '{"question_id": "101669", "prediction": "A"}')


def score(eval_set: EvalSet, matched: Matched) -> dict:
    by_type: dict[str, list[int]] = {}
    for q in eval_set.questions:
        if q.key in matched.answers:
            by_type.setdefault(q.question_type, []).append(int(first_letter(matched.answers[q.key]) == q.answers[0]))
    hits = [h for v in by_type.values() for h in v]
    return {"accuracy": percent(sum(hits), len(hits)),
            "per_question_type": {t: percent(sum(v), len(v)) for t, v in by_type.items()}, **eval_set.notes}


TASK = Task(
    name="seed",
    title="SEED-Bench image part (first-letter exact match)",
    files="--annotations SEED-Bench.json",
    images="SEED-Bench-image/",
    check_files=check_files,
    load=load,
    prediction_file="seed_predictions.jsonl",
    write=write,
    read=read,
    score=score,
    headline=("accuracy",),
)
