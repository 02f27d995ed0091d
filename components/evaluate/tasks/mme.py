"""MME (Fu et al. 2023; BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch).

Files, as published (`MME_Benchmark_release_version/`, given as `--annotations` and as `--images`):
one folder per subtask; each image has a `<stem>.txt` of two lines `<question>\\t<Yes|No>` (one question
answered yes, one no). artwork, celebrity, landmark, posters and scene keep their images in `images/`
and the text files in `questions_answers_YN/`; the other subtasks keep both side by side.
The prompt is the short-answer prompt on the question (LLaVA's `llava_mme.jsonl`).

Result folder `mme_results/`: the eval_tool's layout, one `<subtask>.txt` per subtask with lines
`<image>\\t<question>\\t<ground truth>\\t<response>` (newlines of the response turned to spaces),
scored as the eval_tool's `calculation.py`: the response, lower-cased, is "yes"/"no" when it is exactly
that, else "yes" if its first 4 characters contain "yes", else "no" if they contain "no", else
"other" (wrong). Per subtask: acc (% of questions right), acc+ (% of images with both questions
right), score = acc + acc+ (max 200). Perception sums its 10 subtasks (max 2000), cognition its 4
(max 800); a set missing subtasks sums those present and says which.
"""

from __future__ import annotations

import os

from components.evaluate.datasets import EvalFiles, EvalQuestion, EvalSet, one_file, preview
from components.evaluate.predictions import Matched, Prediction, answered
from components.evaluate.scoring import percent
from components.evaluate.tasks.base import Task, refuse

EVAL_TYPES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
SUBTASKS = EVAL_TYPES["perception"] + EVAL_TYPES["cognition"]
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def question_id(image: str, question: str) -> str:
    """The id of one MME question: its image and its text (an image has two questions)."""
    return f"{image}: {question}"


def parse_answer(text: str) -> str:
    """calculation.py's `parse_pred_ans` on the lower-cased response."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def release_root(path: str) -> str:
    """The folder holding the subtask folders (the release folder or its MME_Benchmark/ inside)."""
    for candidate in (path, os.path.join(path, "MME_Benchmark")):
        if os.path.isdir(candidate) and any(os.path.isdir(os.path.join(candidate, s)) for s in SUBTASKS):
            return candidate
    raise ValueError(f"{path} is not the MME release folder: it holds none of the subtask folders "
                     f"{preview(SUBTASKS, 4)}")


def subtask_layout(root: str, subtask: str) -> tuple[str, str]:
    """(folder of the text files, folder of the images), relative to `root`."""
    if os.path.isdir(os.path.join(root, subtask, "questions_answers_YN")):
        return os.path.join(subtask, "questions_answers_YN"), os.path.join(subtask, "images")
    return subtask, subtask


def find_image(root: str, image_dir: str, stem: str) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(os.path.join(root, image_dir, stem + ext)):
            return stem + ext
    return None


def check_files(files: EvalFiles) -> None:
    refuse(files, "MME", {"annotations"})
    if not files.annotations:
        raise ValueError("MME needs its release folder (MME_Benchmark_release_version) as --annotations")
    one_file(files, "mme", "the MME_Benchmark_release_version folder")


def load(files: EvalFiles, for_run: bool = False) -> EvalSet:
    root = release_root(files.annotations[0])
    base = os.path.relpath(root, files.annotations[0])  # image paths are relative to the folder given
    questions, problems = [], []
    for subtask in SUBTASKS:
        if not os.path.isdir(os.path.join(root, subtask)):
            continue
        text_dir, image_dir = subtask_layout(root, subtask)
        for name in sorted(n for n in os.listdir(os.path.join(root, text_dir)) if n.endswith(".txt")):
            path = os.path.join(root, text_dir, name)
            stem = name[: -len(".txt")]
            image = find_image(root, image_dir, stem)
            if image is None:
                problems.append(f"{path}: no image {stem}.jpg/.png in {os.path.join(root, image_dir)}")
                continue
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip("\r\n") for line in f if line.strip()]
            pairs = [line.split("\t") for line in lines]
            if len(pairs) != 2 or any(len(p) != 2 or p[1].strip().lower() not in ("yes", "no") for p in pairs):
                problems.append(f"{path}: expected two lines '<question>\\t<Yes|No>'")
                continue
            for text, truth in pairs:
                questions.append(EvalQuestion(question_id(image, text), text,
                                              os.path.normpath(os.path.join(base, image_dir, image)), subtask,
                                              answers=(truth.strip(),), group=f"{subtask}/{image}",
                                              info={"image_name": image}))
    if problems:
        raise ValueError(f"{len(problems)} bad MME file(s): " + "; ".join(problems[:5]))
    if not questions:
        raise ValueError(f"{root} holds no MME questions")
    return EvalSet("mme", tuple(questions), (root,))


def write(path: str, eval_set: EvalSet, answers: dict) -> None:
    """The eval_tool's result files, one per subtask, in the set's (pair) order."""
    os.makedirs(path, exist_ok=True)
    rows: dict[str, list[str]] = {}
    for q in answered(eval_set, answers):
        response = " ".join(answers[q.key].replace("\t", " ").splitlines())
        rows.setdefault(q.split, []).append(f"{q.info['image_name']}\t{q.question}\t{q.answers[0]}\t{response}\n")
    for subtask, lines in rows.items():
        tmp = os.path.join(path, f".{subtask}.txt.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, os.path.join(path, f"{subtask}.txt"))


def read(path: str) -> list[Prediction]:
    """A results folder: `<subtask>.txt` files of `image\\tquestion\\tground truth\\tresponse` lines."""
    if not os.path.isdir(path):
        raise ValueError(f"MME predictions {path} must be a folder of <subtask>.txt result files "
                         f"(the eval_tool layout)")
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    unknown = [n for n in names if n[:-4] not in SUBTASKS]
    if unknown or not names:
        raise ValueError(f"MME predictions {path}: " + (f"unknown subtask file(s) {preview(unknown)}; " if unknown else
                         "no result files; ") + f"expected <subtask>.txt for subtasks {preview(SUBTASKS, 4)}")
    predictions, problems = [], []
    for name in names:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 4:
                    problems.append(f"{name}:{lineno}: expected 4 tab-separated fields (image, question, ground truth, "
                                    f"response), got {len(fields)}")
                    continue
                image, question, _, response = fields
                predictions.append(Prediction(question_id(image, question), response, name[:-4],
                                              f"{os.path.join(path, name)}:{lineno}"))
    if problems:
        raise ValueError(f"malformed MME results {path} ({len(problems)} bad line(s)): " + "; ".join(problems[:5]))
    return predictions


def score_subtask(questions: list[EvalQuestion], answers: dict) -> dict:
    right, images = 0, {}
    for q in questions:
        hit = parse_answer(answers[q.key]) == q.answers[0].lower()
        right += hit
        images.setdefault(q.group, []).append(hit)
    paired = [hits for hits in images.values() if len(hits) == 2]
    acc = percent(right, len(questions))
    acc_plus = percent(sum(all(h) for h in paired), len(paired))
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "num_questions": len(questions),
            "num_images": len(paired)}


def score(eval_set: EvalSet, matched: Matched) -> dict:
    per_subtask = {}
    for subtask in SUBTASKS:
        questions = [q for q in eval_set.questions if q.split == subtask and q.key in matched.answers]
        if questions:
            per_subtask[subtask] = score_subtask(questions, matched.answers)
    totals = {}
    for kind, names in EVAL_TYPES.items():
        present = [n for n in names if n in per_subtask]
        totals[kind] = sum(per_subtask[n]["score"] for n in present)
        totals[f"{kind}_subtasks"] = len(present)
        totals[f"{kind}_max"] = 200 * len(present)
    missing = [n for n in SUBTASKS if n not in per_subtask]
    return {**totals, "per_subtask": per_subtask, "missing_subtasks": ", ".join(missing) or "none"}


TASK = Task(
    name="mme",
    title="MME (yes/no pairs: acc, acc+, perception and cognition totals)",
    files="--annotations MME_Benchmark_release_version",
    images="MME_Benchmark_release_version (the same folder)",
    check_files=check_files,
    load=load,
    prediction_file="mme_results",
    write=write,
    read=read,
    score=score,
    headline=("perception", "cognition"),
    images_from_annotations=True,
)
