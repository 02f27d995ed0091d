"""The evaluation tasks, one module each, listed in one table.

| task | files (published layout) | scored as |
|---|---|---|
| pope | coco_pope_{random,popular,adversarial}.json; llava_pope_test.jsonl | eval_pope.py |
| vqav2 | v2_*_{questions,annotations}.json; llava_vqav2_mscoco_test-dev2015.jsonl | vqaEval.py; EvalAI |
| textvqa | TextVQA_0.5.1_val.json + TextVQA_Rosetta_OCR_v0.2_val.json or LLaVA's OCR jsonl | m4c_evaluator |
| gqa | testdev_balanced_questions.json | GQA eval.py (after convert_gqa_for_eval.py) |
| scienceqa | problems.json + pid_splits.json | eval_science_qa.py, IMG subset |
| mme | MME_Benchmark_release_version/ | eval_tool calculation.py |
| seed | SEED-Bench.json (image part) | first-letter exact match |
| mmbench | mmbench_dev_20230712.tsv | CircularEval, letter matching only |

Each module documents its files, prompt, result format and scoring rules, and builds one `Task`.
"""

from __future__ import annotations

from components.evaluate.tasks import gqa, mmbench, mme, pope, scienceqa, seed, textvqa, vqav2
from components.evaluate.tasks.base import Task

TASKS: dict[str, Task] = {t.name: t for t in (pope.TASK, vqav2.TASK, textvqa.TASK, gqa.TASK, scienceqa.TASK,
                                               mme.TASK, seed.TASK, mmbench.TASK)}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return TASKS[name]


def headline(task: str, metrics: dict) -> dict[str, float]:
    """The task's headline metrics, by dotted name, from its metrics dict (those present)."""
    out = {}
    for name in get_task(task).headline:
        value = metrics
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            out[name] = value
    return out
