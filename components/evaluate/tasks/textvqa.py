"""TextVQA 0.5.1 (Singh et al. 2019; textvqa.org), with LLaVA-1.5's OCR-token prompt by default.

Files, as published:
- `TextVQA_0.5.1_val.json`: `{"data": [{"question_id", "question", "image_id", "answers": [10 strings],
  "set_name": "val", ...}]}`; images `{image_id}.jpg` (the val images ship in `train_images/`).
  The test file has no answers.
- `TextVQA_Rosetta_OCR_v0.2_val.json`: `{"data": [{"image_id", "ocr_tokens": [...], "ocr_info": [...]}]}`.
- LLaVA's `llava_textvqa_val_v051_ocr.jsonl` (`scripts/v1_5/eval/textvqa.sh`): `{"question_id": <image_id>,
  "image", "text": "<question>\\nReference OCR token: <tokens>\\nAnswer the question using a single word or
  phrase.", ...}`. `llava/eval/eval_textvqa.py` finds each line's annotation by (image id, the question
  recovered from the prompt, lower-cased); so does this loader.

Protocols (`--protocol`):
- `ocr` (default, "llava-1.5-ocr"): the prompt carries the image's Rosetta OCR tokens (from `--ocr`,
  or the prompts of `--questions llava_textvqa_val_v051_ocr.jsonl` as written);
- `no-ocr`: the plain short-answer prompt.
Metrics name the protocol (`--protocol` takes those names too). Scoring is LLaVA's m4c_evaluator
(`scoring.textvqa_accuracy`); the result file is the EvalAI format `[{"question_id", "answer"}]`.
"""

from __future__ import annotations

from components.evaluate.datasets import (
    EvalFiles,
    EvalQuestion,
    EvalSet,
    check_unique,
    one_file,
    preview,
    question_id,
    read_json,
    read_json_lines,
)
from components.evaluate.predictions import read_vqa_predictions
from components.evaluate.prompts import OCR_PREFIX, ocr_prompt, short_answer_prompt, strip_short_answer
from components.evaluate.scoring import score_vqa
from components.evaluate.tasks.base import Task, refuse
from components.evaluate.tasks.vqav2 import write

PROTOCOLS = {"ocr": "llava-1.5-ocr", "no-ocr": "no-ocr"}


def load_annotations(path: str) -> list[EvalQuestion]:
    """TextVQA 0.5.1 questions (with their 10 answers, absent from the test file); prompts not yet set."""
    raw = read_json(path, "TextVQA")
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ValueError(f"{path} is not a TextVQA file: expected an object with a 'data' list")
    questions = []
    for i, item in enumerate(raw["data"]):
        where = f"{path}: item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or "image_id" not in item:
            raise ValueError(f"{where}: expected an object with question_id, image_id and a question string")
        qid = question_id(item.get("question_id"), where)
        answers = item.get("answers") or ()
        if answers and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where}: answers must be a list of strings")
        if answers and len(answers) != 10:
            raise ValueError(f"{where}: question {qid} has {len(answers)} answers; TextVQA questions have 10")
        split = item.get("set_name") or raw.get("dataset_type") or "val"
        questions.append(EvalQuestion(qid, item["question"], f"{item['image_id']}.jpg", str(split),
                                      answers=tuple(answers), info={"image_id": str(item["image_id"])}))
    if len({q.split for q in questions}) > 1:
        raise ValueError(f"{path} mixes set names {sorted({q.split for q in questions})}; use one split per file")
    check_unique(questions, path)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def ocr_tokens(path: str) -> dict[str, list[str]]:
    """image_id -> its Rosetta OCR tokens."""
    raw = read_json(path, "TextVQA OCR")
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ValueError(f"{path} is not a Rosetta OCR file: expected an object with a 'data' list")
    tokens = {}
    for i, item in enumerate(raw["data"]):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("ocr_tokens"), list):
            raise ValueError(f"{path}: item {i}: expected an object with image_id and an ocr_tokens list")
        tokens[str(item["image_id"])] = [str(t) for t in item["ocr_tokens"]]
    return tokens


def question_of_prompt(prompt: str) -> str:
    """eval_textvqa.py's `prompt_processor` for LLaVA-1.5's prompts: the question line, lower-cased."""
    return strip_short_answer(prompt).lower()


def llava_prompts(path: str, questions: list[EvalQuestion]) -> dict:
    """question_id -> the prompt of LLaVA's question file, matched by (image id, question) as eval_textvqa.py."""
    by_image_question = {(q.info["image_id"], q.question.lower()): q for q in questions}
    prompts, unknown = {}, []
    for where, record in read_json_lines(path, "LLaVA TextVQA questions", ("question_id", "text")):
        q = by_image_question.get((str(record["question_id"]), question_of_prompt(str(record["text"]))))
        if q is None:
            unknown.append(where)
            continue
        prompts[q.question_id] = str(record["text"])
    missing = [q.question_id for q in questions if q.question_id not in prompts]
    if unknown or missing:
        parts = [f"{len(unknown)} line(s) match no annotated question ({preview(unknown, 3)})"] if unknown else []
        parts += [f"{len(missing)} annotated question(s) have no line ({preview(missing)})"] if missing else []
        raise ValueError(f"mismatched TextVQA files {path} and the annotations: " + "; ".join(parts))
    return prompts


def check_files(files: EvalFiles) -> None:
    refuse(files, "TextVQA", {"annotations", "questions", "ocr", "protocol"})
    if not files.annotations:
        raise ValueError("TextVQA needs its file (TextVQA_0.5.1_val.json) as --annotations")
    one_file(files, "textvqa", "TextVQA_0.5.1_val.json")
    if files.protocol and files.protocol not in (*PROTOCOLS, *PROTOCOLS.values()):
        raise ValueError(f"unknown TextVQA protocol {files.protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def load(files: EvalFiles, for_run: bool = False) -> EvalSet:
    protocol = {v: k for k, v in PROTOCOLS.items()}.get(files.protocol, files.protocol or "ocr")  # names as output
    path = files.annotations[0]
    questions = load_annotations(path)
    sources = [path]
    prompts: dict = {}
    if files.questions:
        prompts = llava_prompts(files.questions, questions)
        sources.append(files.questions)
        if protocol == "ocr" and not any(OCR_PREFIX in p for p in prompts.values()):
            raise ValueError(f"{files.questions} holds no 'Reference OCR token:' prompts; pass the OCR file with "
                             f"--ocr, or use --protocol no-ocr")
    if protocol == "ocr" and files.ocr:
        tokens = ocr_tokens(files.ocr)
        sources.append(files.ocr)
        missing = sorted({q.info["image_id"] for q in questions} - set(tokens))
        if missing:
            raise ValueError(f"mismatched files: {len(missing)} image(s) of {path} are not in {files.ocr} "
                             f"({preview(missing)}); use the OCR file of the same split")
        prompts = {q.question_id: ocr_prompt(q.question, tokens[q.info["image_id"]]) for q in questions}
    elif protocol == "ocr" and not files.questions and for_run:
        raise ValueError("TextVQA's LLaVA-1.5 protocol puts the Rosetta OCR tokens in the prompt: pass "
                         "--ocr TextVQA_Rosetta_OCR_v0.2_val.json or --questions llava_textvqa_val_v051_ocr.jsonl, "
                         "or choose --protocol no-ocr")
    if protocol == "no-ocr":
        prompts = {q.question_id: short_answer_prompt(q.question) for q in questions}
    questions = [EvalQuestion(q.question_id, q.question, q.image, q.split, answers=q.answers, info=q.info,
                              prompt=prompts.get(q.question_id, "")) for q in questions]
    # scoring does not depend on the prompt: `eval score` names the protocol only when told (or shown) it
    named = for_run or files.protocol or files.ocr or files.questions
    return EvalSet("textvqa", tuple(questions), tuple(sources), protocol=PROTOCOLS[protocol] if named else None)


TASK = Task(
    name="textvqa",
    title="TextVQA val (LLaVA-1.5 OCR-token prompt by default)",
    files="--annotations TextVQA_0.5.1_val.json; --ocr TextVQA_Rosetta_OCR_v0.2_val.json or "
          "--questions llava_textvqa_val_v051_ocr.jsonl (prompts); --protocol ocr|no-ocr",
    images="TextVQA train_images/",
    check_files=check_files,
    load=load,
    prediction_file="textvqa_predictions.json",
    write=write,
    read=read_vqa_predictions,
    score=score_vqa,
    headline=("accuracy",),
    protocols=tuple(PROTOCOLS),
)
