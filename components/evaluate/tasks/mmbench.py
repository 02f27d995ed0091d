"""MMBench dev, English (Liu et al. 2023; open-compass/MMBench, VLMEvalKit), with CircularEval.

File, as published: `mmbench_dev_20230712.tsv` (tab-separated, a header line) with the columns
`index, question, hint, A, B, C, D, answer, category, image, source, l2-category, comment, split`;
`image` is the base64 image (embedded: no `--images`), an absent option or hint is an empty cell
(or "nan"/"none"). Circular copies of a question (its options rotated) are rows whose index is the
question's plus a multiple of 1,000,000 (`g_index = index % 1e6`, VLMEvalKit's
`mcq_circular_eval`); a copy's `image` cell may hold the index of the row whose image it shares.
A file without copies gets them here, as LLaVA's `model_vqa_mmbench.py --all-rounds` makes them:
each round rotates the options by one (`options[1:] + options[:1]`).

Prompt (LLaVA's `model_vqa_mmbench.py --single-pred-prompt`): `<hint>\\n` when there is a hint, the
question, `A. ...` lines, "Answer with the option's letter from the given choices directly."

Result file: LLaVA's answer lines `{"question_id": <index>, "round_id", "prompt", "text", "options",
"option_char"}`. Scoring: the letter is found by letter matching only, VLMEvalKit's `can_infer_option`
(`vlmeval/utils/matching_util.py` at e8e78f0); no GPT matcher is used, so a reply that names no
letter is wrong (VLMEvalKit's `exact_matching` policy). CircularEval: a question counts as right only
when every one of its rotations is; accuracy over questions, per category and per l2-category, and
the vanilla accuracy of the original rows alone.
"""

from __future__ import annotations

import csv
import math
import re
import sys

from components.evaluate.datasets import EvalFiles, EvalQuestion, EvalSet, check_unique, one_file
from components.evaluate.predictions import Matched, answered, read_answer_lines, write_json_lines
from components.evaluate.prompts import LETTERS, multiple_choice_prompt
from components.evaluate.scoring import percent
from components.evaluate.tasks.base import Task, refuse

OPTION_COLUMNS = ("A", "B", "C", "D")  # model_vqa_mmbench.py's all_options
CIRCULAR_STRIDE = 1_000_000
MATCHER = "letter matching only (VLMEvalKit can_infer_option); no GPT matcher was used"
REJECTIONS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
              "I'm sorry, but without the image provided", "Cannot determine the answer")
VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def is_none(value) -> bool:
    """model_vqa_mmbench.py's `is_none`: an empty cell, NaN, "nan" or "none"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def can_infer_option(answer: str, choices: dict) -> str | bool:
    """VLMEvalKit's letter matching: the one option letter standing alone among the last words of the reply
    (after turning `.()[],:;!*#{}` into spaces); "Z" for a refusal or a lone "Z"; else False."""
    if "Failed to obtain answer via API" in answer:
        return False
    if any(err in answer for err in REJECTIONS):
        return "Z"
    answer_mod = answer
    for c in ".()[],:;!*#{}":
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > (len(splits) - 5):
                return ch
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    match = VERBOSE_ANSWER.search(answer or "")
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return False


def read_tsv(path: str) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's default field limit
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        raise ValueError(f"MMBench file {path} does not exist") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"MMBench file {path} is not a readable TSV: {err}") from None
    if not rows:
        raise ValueError(f"MMBench file {path} holds no rows")
    missing = [c for c in ("index", "question", "A", "B", "image") if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} is not an MMBench TSV: no column(s) {', '.join(missing)} "
                         f"(found {', '.join(list(rows[0])[:8])})")
    return rows


def rotations(row: dict) -> list[dict]:
    """LLaVA's --all-rounds: round r shows the options rotated r times; the answer letter moves with them."""
    options = [row[c] for c in OPTION_COLUMNS if c in row]
    n = next((i for i, o in enumerate(options) if is_none(o)), len(options))
    options = options[:n]
    rounds = []
    for r in range(len(options)):
        shown = options[r:] + options[:r]
        rotated = dict(row, index=str(int(row["index"]) + r * CIRCULAR_STRIDE),
                       **{c: (shown[i] if i < n else "") for i, c in enumerate(OPTION_COLUMNS) if c in row})
        answer = "" if is_none(row.get("answer")) else row["answer"].strip()
        if answer in LETTERS[:n]:  # others are reported by the loader
            rotated["answer"] = LETTERS[(LETTERS.index(answer) - r) % n]
        rounds.append(rotated)
    return rounds


def check_files(files: EvalFiles) -> None:
    refuse(files, "MMBench", {"annotations"})
    if not files.annotations:
        raise ValueError("MMBench needs its TSV (mmbench_dev_20230712.tsv) as --annotations")
    one_file(files, "mmbench", "mmbench_dev_20230712.tsv")


def load(files: EvalFiles, for_run: bool = False) -> EvalSet:
    path = files.annotations[0]
    rows = read_tsv(path)
    problems = []
    for i, row in enumerate(rows):
        if not str(row.get("index", "")).strip().isdigit():
            problems.append(f"row {i + 2}: index must be a non-negative integer, got {row.get('index')!r:.20}")
    if problems:
        raise ValueError(f"{len(problems)} bad row(s) in {path}: " + "; ".join(problems[:5]))
    expanded = not any(int(r["index"]) >= CIRCULAR_STRIDE for r in rows)
    if expanded:
        rows = [rotated for row in rows for rotated in rotations(row)]
    images = {int(r["index"]): r["image"] for r in rows}
    questions = []
    for i, row in enumerate(rows):
        index = int(row["index"])
        where = f"{path}: row with index {index}"
        options = []
        for c in OPTION_COLUMNS:
            if c not in row or is_none(row[c]):
                break
            options.append(row[c])
        answer = None if is_none(row.get("answer")) else row["answer"].strip()
        if len(options) < 2 or (answer is not None and answer not in LETTERS[: len(options)]):
            problems.append(f"{where}: needs at least options A and B and an answer among them, got "
                            f"{len(options)} option(s) and answer {answer!r}")
            continue
        image = row["image"]
        if len(image) <= 64 and image.strip().isdigit():  # a copy pointing at the row holding its image
            image = images.get(int(image), "")
        if not image or is_none(image):
            problems.append(f"{where}: no image")
            continue
        hint = None if is_none(row.get("hint")) else row["hint"]
        questions.append(EvalQuestion(
            index, row["question"], "", row.get("split") or "dev", answers=(answer,) if answer else (),
            choices=tuple(options), prompt=multiple_choice_prompt(row["question"], options,
                                                                  prefix=f"{hint}\n" if hint else ""),
            group=index % CIRCULAR_STRIDE, image_data=image,
            info={"category": row.get("category") or "", "l2-category": row.get("l2-category") or ""}))
    if problems:
        raise ValueError(f"{len(problems)} bad row(s) in {path}: " + "; ".join(problems[:5]))
    check_unique(questions, path)
    groups = {q.group for q in questions}
    originals = {q.question_id for q in questions if q.question_id < CIRCULAR_STRIDE}
    orphans = sorted(groups - originals)
    if orphans:
        raise ValueError(f"{path}: circular copies without their original row (index {orphans[0]})")
    return EvalSet("mmbench", tuple(questions), (path,),
                   notes={"circular_copies": "made here (--all-rounds rotation)" if expanded else "from the file"})


def write(path: str, eval_set: EvalSet, answers: dict) -> None:
    write_json_lines(path, ({"question_id": q.question_id, "round_id": q.question_id // CIRCULAR_STRIDE,
                             "prompt": q.prompt, "text": answers[q.key], "options": list(q.choices),
                             "option_char": list(LETTERS[: len(q.choices)])} for q in answered(eval_set, answers)))


def read(path: str):
    return read_answer_lines(path, ("text",), '{"question_id": 12, "text": "B"}')


def score(eval_set: EvalSet, matched: Matched) -> dict:
    groups: dict = {}
    for q in eval_set.questions:
        groups.setdefault(q.group, []).append(q)
    hits, vanilla, by_category, by_l2 = [], [], {}, {}
    unmatched = 0
    for group in groups.values():
        if not all(q.key in matched.answers for q in group):
            continue  # a question counts only with all its rotations answered
        right = []
        for q in group:
            letter = can_infer_option(matched.answers[q.key], dict(zip(LETTERS, q.choices)))
            unmatched += letter is False
            right.append(letter == q.answers[0])
            if q.question_id == q.group:
                vanilla.append(right[-1])
        hit = int(all(right))
        hits.append(hit)
        by_category.setdefault(group[0].info["category"], []).append(hit)
        by_l2.setdefault(group[0].info["l2-category"], []).append(hit)
    return {"accuracy": percent(sum(hits), len(hits)), "vanilla_accuracy": percent(sum(vanilla), len(vanilla)),
            "circular_questions": len(hits), "replies_without_a_letter": unmatched,
            "per_category": {c: percent(sum(v), len(v)) for c, v in sorted(by_category.items())},
            "per_l2_category": {c: percent(sum(v), len(v)) for c, v in sorted(by_l2.items())},
            "evaluation": "CircularEval", "matcher": MATCHER, **eval_set.notes}


TASK = Task(
    name="mmbench",
    title="MMBench dev (en), CircularEval, letter matching only",
    files="--annotations mmbench_dev_20230712.tsv (images embedded)",
    images="",
    check_files=check_files,
    load=load,
    prediction_file="mmbench_answers.jsonl",
    write=write,
    read=read,
    score=score,
    headline=("accuracy",),
)
