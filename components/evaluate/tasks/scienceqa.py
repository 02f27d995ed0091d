"""ScienceQA-IMG (Lu et al. 2022; lupantech/ScienceQA), as LLaVA-1.5 evaluates it.

Files, as published (`data/scienceqa/` of the ScienceQA repository):
- `problems.json`: `{"<pid>": {"question", "choices": [...], "answer": <index>, "hint", "image": "image.png"
  or null, "subject", "grade", "split", ...}}`; `pid_splits.json`: `{"train": [...], "val": [...],
  "test": [...], ...}`; images `images/<split>/<pid>/image.png`.
`--annotations` is that folder (or its problems.json; pid_splits.json beside it); `--images` is
`images/test`. The test split's questions with an image are ScienceQA-IMG; text-only questions are
left out (counted in the summary).

Prompt (LLaVA's `llava_test_CQM-A.json` with `--single-pred-prompt`): `Context: <hint>\\n` when there is a
hint, the question, `A. <choice>` lines, "Answer with the option's letter from the given choices directly."

Result file: LLaVA's answer lines `{"question_id": <pid>, "prompt": "<image>\\n...", "text"}`. Extraction as
`llava/eval/eval_science_qa.py`: the answer is the text itself when it is one of A-E; else its first
letter when the text starts with "<letter>. "; else the letter of the one match of
`The answer is ([A-Z]).`; else it failed. A letter beyond the question's choices counts as wrong.
Accuracy is over the image questions.
"""

from __future__ import annotations

import os
import re

from components.evaluate.datasets import EvalFiles, EvalQuestion, EvalSet, one_file, read_json
from components.evaluate.predictions import Matched, answered, read_answer_lines, write_json_lines
from components.evaluate.prompts import LETTERS, multiple_choice_prompt
from components.evaluate.scoring import percent
from components.evaluate.tasks.base import Task, refuse

OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
FAILED = "FAILED"


def extract_answer(text: str) -> str:
    """eval_science_qa.py's parsing of a reply into a letter (or "FAILED")."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def is_correct(text: str, num_choices: int, answer: str) -> bool:
    """get_pred_idx: only letters of the question's own choices can be right."""
    letter = extract_answer(text)
    return letter in OPTIONS[:num_choices] and letter == answer


def science_prompt(problem: dict) -> str:
    hint = problem.get("hint") or ""
    return multiple_choice_prompt(problem["question"], list(problem["choices"]),
                                  prefix=f"Context: {hint}\n" if hint else "")


def check_files(files: EvalFiles) -> None:
    refuse(files, "ScienceQA", {"annotations"})
    if not files.annotations:
        raise ValueError("ScienceQA needs the folder holding problems.json and pid_splits.json (or problems.json) "
                         "as --annotations")
    one_file(files, "scienceqa", "the ScienceQA data folder")


def load(files: EvalFiles, for_run: bool = False, split: str = "test") -> EvalSet:
    path = files.annotations[0]
    if not os.path.exists(path):
        raise ValueError(f"ScienceQA data folder {path} does not exist (it holds problems.json and pid_splits.json)")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    problems_path = path if not os.path.isdir(path) else os.path.join(folder, "problems.json")
    problems = read_json(problems_path, "ScienceQA problems")
    splits = read_json(os.path.join(folder, "pid_splits.json"), "ScienceQA pid_splits")
    if not isinstance(problems, dict) or not isinstance(splits, dict) or not isinstance(splits.get(split), list):
        raise ValueError(f"{folder}: expected problems.json (pid -> problem) and pid_splits.json with a {split!r} list")
    questions, problems_found, text_only = [], [], 0
    for pid in splits[split]:
        problem = problems.get(str(pid))
        where = f"{problems_path}: problem {pid}"
        if not isinstance(problem, dict):
            problems_found.append(f"{where}: listed in pid_splits.json but absent")
            continue
        choices = problem.get("choices")
        if (not isinstance(problem.get("question"), str) or not isinstance(choices, list) or not choices
                or len(choices) > len(OPTIONS) or not isinstance(problem.get("answer"), int)
                or not 0 <= problem["answer"] < len(choices)):
            problems_found.append(f"{where}: needs a question, 1-{len(OPTIONS)} choices and an answer index into them")
            continue
        if not problem.get("image"):
            text_only += 1
            continue
        questions.append(EvalQuestion(
            str(pid), problem["question"], f"{pid}/{problem['image']}", split, prompt=science_prompt(problem),
            choices=tuple(str(c) for c in choices), answers=(LETTERS[problem["answer"]],),
            info={"subject": problem.get("subject")}))
    if problems_found:
        raise ValueError(f"{len(problems_found)} bad problem(s): " + "; ".join(problems_found[:5]))
    if not questions:
        raise ValueError(f"the {split} split of {folder} has no question with an image")
    return EvalSet("scienceqa", tuple(questions), (problems_path, os.path.join(folder, "pid_splits.json")),
                   notes={"text_only_questions_left_out": text_only})


def write(path: str, eval_set: EvalSet, answers: dict) -> None:
    write_json_lines(path, ({"question_id": q.question_id, "prompt": "<image>\n" + q.prompt, "text": answers[q.key]}
                            for q in answered(eval_set, answers)))


def read(path: str):
    return read_answer_lines(path, ("text",), '{"question_id": "4", "text": "A"}')


def score(eval_set: EvalSet, matched: Matched) -> dict:
    correct = failed = total = 0
    by_subject: dict[str, list[int]] = {}
    for q in eval_set.questions:
        if q.key not in matched.answers:
            continue
        text = matched.answers[q.key]
        hit = int(is_correct(text, len(q.choices), q.answers[0]))
        failed += extract_answer(text) == FAILED
        correct += hit
        total += 1
        by_subject.setdefault(str(q.info.get("subject")), []).append(hit)
    return {"accuracy": percent(correct, total), "correct": correct, "failed_extractions": failed,
            "per_subject": {s: percent(sum(v), len(v)) for s, v in sorted(by_subject.items())},
            "subset": "IMG (test questions with an image)", **eval_set.notes}


TASK = Task(
    name="scienceqa",
    title="ScienceQA-IMG (multiple choice, LLaVA's letter extraction)",
    files="--annotations the folder of problems.json and pid_splits.json",
    images="ScienceQA images/test",
    check_files=check_files,
    load=load,
    prediction_file="scienceqa_answers.jsonl",
    write=write,
    read=read,
    score=score,
    headline=("accuracy",),
)
