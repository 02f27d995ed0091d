"""Each eval task's headline metric (the number papers report for it) and the published numbers of the
paper and its anchors, for `bitllava runs compare`.

The rule: a task's headline is the MLflow metric key written in `HEADLINES` (the key `bitllava eval run`
logs: `flatten_metrics(metrics, prefix=f"{task}/")`, so the dotted name `mean.f1` is `pope/mean/f1`); it is
the one of the task's `Task.headline` names (components/evaluate/tasks) that papers report, which a test
checks. A task missing from the table falls back to `<task>/accuracy`.

Published numbers come from the LLaVaOLMoBitNet1B paper, Table 2 (Sundaram & Iyer, "LLaVaOLMoBitNet1B:
Ternary LLM goes Multimodal!"), which follows LLaVA-1.5's evaluation: POPE is the F1 averaged over its
random / popular / adversarial splits, VQAv2 the test-dev accuracy (EvalAI), TextVQA the val accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Headline:
    metric: str
    """MLflow metric key of the task's eval run."""
    label: str
    """Column header."""
    meaning: str
    """What the number is, for the legend under the table."""


HEADLINES: dict[str, Headline] = {
    "pope": Headline("pope/mean/f1", "POPE F1", "F1 (%), mean of the random, popular and adversarial splits"),
    "vqav2": Headline("vqav2/accuracy", "VQAv2", "VQA accuracy (%); published: test-dev, here: the split evaluated"),
    "textvqa": Headline("textvqa/accuracy", "TextVQA", "VQA accuracy (%), val"),
    "gqa": Headline("gqa/accuracy", "GQA", "exact-match accuracy (%), testdev-balanced"),
    "scienceqa": Headline("scienceqa/accuracy", "SQA-IMG", "accuracy (%) over the questions with an image"),
    "mme": Headline("mme/perception", "MME-P", "perception score (acc + acc+ summed over 10 subtasks, max 2000)"),
    "seed": Headline("seed/accuracy", "SEED-I", "accuracy (%), image questions"),
    "mmbench": Headline("mmbench/accuracy", "MMBench", "CircularEval accuracy (%), dev (en), letter matching only"),
}


def headline(task: str) -> Headline:
    """The task's entry in HEADLINES, else `<task>/accuracy`."""
    return HEADLINES.get(task, Headline(f"{task}/accuracy", task, "accuracy (%)"))


TABLE_2 = "LLaVaOLMoBitNet1B paper, Table 2"


@dataclass(frozen=True)
class Published:
    model: str
    params: str
    scores: dict[str, float]
    """Task -> the headline number as published."""
    source: str


# Table 2 of the paper, as printed (LLaVA-Gemma-2B has no TextVQA entry there).
PUBLISHED: tuple[Published, ...] = (
    Published("LLaVaOLMoBitNet1B", "1B", {"pope": 66.92, "vqav2": 68.41, "textvqa": 26.3}, TABLE_2),
    Published("TinyLLaVA 3B", "3B", {"pope": 86.8, "vqav2": 77.6, "textvqa": 51.4}, TABLE_2),
    Published("LLaVA-Gemma-2B", "2B", {"pope": 85.0, "vqav2": 70.7}, TABLE_2),
)
