"""Scoring: the VQA and POPE metrics (shared by several tasks), coverage, and `eval score`.

Each task's own rules (GQA exact match, ScienceQA letter extraction, MME acc+, SEED-Bench first
letter, MMBench CircularEval) live in its module under `components.evaluate.tasks`.

VQA accuracy (Antol et al. 2015; Goyal et al. 2017): for a predicted answer and the n human
answers (n = 10), average over the n subsets that leave one human answer out of
min(1, #humans in the subset who gave the predicted answer / 3).

- TextVQA: LLaVA's `llava/eval/m4c_evaluator.py` (`TextVQAAccuracyEvaluator`, from mmf): the
  prediction and every human answer go through the full EvalAI normalisation.
- VQAv2: the VQA evaluation script (`vqaEval.py`, run by EvalAI for the VQA challenge) on a
  result file written as LLaVA's `convert_vqav2_for_submission.py` writes it: the prediction is
  EvalAI-normalised, then the script's `processPunctuation` and `processDigitArticle` run on it
  again; the human answers only go through `processPunctuation`, and only when they are not all
  identical. Accuracy is reported overall and per answer type.
- POPE: LLaVA's `llava/eval/eval_pope.py`: keep the text before the first ".", delete commas, split
  on single spaces; the answer is "no" if a word is exactly "No", "not" or "no", else "yes".
  Accuracy, precision, recall and F1 of "yes" as the positive class, and the ratio of "yes"
  answers, per split. Where the script would divide by zero (no "yes" answer at all), 0 is
  reported instead.

All rates are percentages (0-100), as in the papers' tables.
"""

from __future__ import annotations

from components.evaluate.answer_processing import normalize_answer, process_digit_article, process_punctuation
from components.evaluate.datasets import EvalSet, load_eval_set
from components.evaluate.predictions import Matched, match_predictions, read_predictions


def leave_one_out_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, matches / 3); inputs already normalised. In [0, 1]."""
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    scores = []
    for left_out in range(len(human_answers)):
        matches = sum(1 for i, a in enumerate(human_answers) if i != left_out and a == prediction)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def textvqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """One TextVQA question (m4c_evaluator): everything EvalAI-normalised. In [0, 1]."""
    return leave_one_out_accuracy(normalize_answer(prediction), [normalize_answer(a) for a in human_answers])


def vqav2_accuracy(prediction: str, human_answers: list[str]) -> float:
    """One VQAv2 question (vqaEval.py on an EvalAI-normalised result). In [0, 1]."""
    answer = process_digit_article(process_punctuation(normalize_answer(prediction).strip()))
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(a) for a in humans]
    return leave_one_out_accuracy(answer, humans)


def pope_answer(text: str) -> str:
    """eval_pope.py's parsing of a free-form answer into "yes" or "no"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def pope_metrics(pairs: list[tuple[str, str]]) -> dict:
    """(parsed answer, label) pairs of one split -> accuracy, precision, recall, F1, yes ratio (%) and counts."""
    if not pairs:
        raise ValueError("POPE metrics need at least one answered question")
    tp = sum(1 for p, y in pairs if p == "yes" and y == "yes")
    fp = sum(1 for p, y in pairs if p == "yes" and y == "no")
    tn = sum(1 for p, y in pairs if p == "no" and y == "no")
    fn = sum(1 for p, y in pairs if p == "no" and y == "yes")
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "accuracy": 100 * (tp + tn) / len(pairs),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": 100 * (tp + fp) / len(pairs),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def coverage(num_answered: int, num_questions: int) -> dict:
    return {"num_questions": num_questions, "num_answered": num_answered,
            "coverage": 100 * num_answered / num_questions}


def score_pope(eval_set: EvalSet, matched: Matched) -> dict:
    splits = {}
    for split in eval_set.splits:
        questions = [q for q in eval_set.questions if q.split == split]
        pairs = [(pope_answer(matched.answers[q.key]), q.label) for q in questions if q.key in matched.answers]
        if pairs:
            splits[split] = {**pope_metrics(pairs), **coverage(len(pairs), len(questions))}
    names = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {name: sum(s[name] for s in splits.values()) / len(splits) for name in names}
    return {"splits": splits, "mean": mean}


def score_vqa(eval_set: EvalSet, matched: Matched) -> dict:
    per_question = textvqa_accuracy if eval_set.task == "textvqa" else vqav2_accuracy
    scores, by_type = [], {}
    for q in eval_set.questions:
        if q.key not in matched.answers:
            continue
        if not q.answers:
            raise ValueError(f"question {q.question_id} has no human answers in {', '.join(eval_set.sources)}; "
                             f"only sets with answers (val) can be scored here (test sets are scored by EvalAI)")
        score = per_question(matched.answers[q.key], list(q.answers))
        scores.append(score)
        if q.answer_type is not None:
            by_type.setdefault(q.answer_type, []).append(score)
    result = {"accuracy": 100 * sum(scores) / len(scores)}
    if by_type:
        result["per_answer_type"] = {t: 100 * sum(v) / len(v) for t, v in sorted(by_type.items())}
    return result


def percent(hits: int, total: int) -> float:
    return 100 * hits / total if total else 0.0


def score(eval_set: EvalSet, matched: Matched) -> dict:
    """Metrics of matched predictions, with coverage; only answered questions are scored."""
    from components.evaluate.tasks import get_task

    metrics = get_task(eval_set.task).score(eval_set, matched)
    protocol = {"protocol": eval_set.protocol} if eval_set.protocol else {}
    return {"task": eval_set.task, **protocol, **metrics, **coverage(matched.num_answered, matched.num_questions)}


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"pope/random/f1": ...} for MLflow (numbers only; "yes/no" -> "yes_no")."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{str(key).replace('/', '_').replace(' ', '_')}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def score_files(
    task: str,
    predictions_path: str,
    annotations: list[str],
    questions: str | None = None,
    allow_partial: bool = False,
    *,
    ocr: str | None = None,
    test_questions: str | None = None,
    protocol: str | None = None,
) -> dict:
    """What `bitllava eval score` prints: load, check, match and score a result file."""
    eval_set = load_eval_set(task, annotations, questions, ocr=ocr, test_questions=test_questions, protocol=protocol)
    if not eval_set.has_ground_truth:
        raise ValueError(f"{', '.join(eval_set.sources)} holds no answers to score against "
                         f"(a test split? submit the result file to the benchmark's server instead)")
    matched = match_predictions(eval_set, read_predictions(task, predictions_path), allow_partial)
    return score(eval_set, matched)
