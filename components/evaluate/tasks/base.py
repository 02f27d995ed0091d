"""What every evaluation task declares: its files, loader, result format and scorer.

A task module (`pope.py`, `gqa.py`, ...) builds one `Task`; `components.evaluate.tasks` lists them
all in one table. The run (`components.evaluate.run`) and `eval score` only go through these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from components.evaluate.datasets import EvalFiles, EvalSet
from components.evaluate.predictions import Matched, Prediction


def no_extra_outputs(out_dir: str, eval_set: EvalSet, answers: dict, files: EvalFiles) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Task:
    """One benchmark as its official scripts define it.

    name: the task's name on the command line and in metric names.
    title: what the task is, for help and summaries.
    files: which files `--annotations` / `--questions` / `--ocr` / `--test-questions` take (help text).
    images: what `--images` is ("" when the files embed their images).
    check_files: raises ValueError when the given files cannot make a set (before anything runs).
    load: (files, for_run) -> EvalSet; `for_run`: the set will be answered, so prompts must be complete.
    prediction_file: name of the result file (or folder) written in the official format.
    write: (path, eval_set, answers by question key) -> None.
    read: path -> predictions; malformed files are a ValueError naming the bad entries.
    score: (eval_set, matched predictions) -> metrics.
    headline: metric names (dotted paths into the metrics) a summary shows first.
    protocols: prompt protocols, default first (empty: the task has one).
    extra_outputs: files written besides the result file (VQAv2's EvalAI submission), by artifact path.
    images_from_annotations: the annotations folder is also the image folder (MME's release folder).
    """

    name: str
    title: str
    files: str
    images: str
    check_files: Callable[[EvalFiles], None]
    load: Callable[[EvalFiles, bool], EvalSet]
    prediction_file: str
    write: Callable[[str, EvalSet, dict], None]
    read: Callable[[str], list[Prediction]]
    score: Callable[[EvalSet, Matched], dict]
    headline: tuple[str, ...]
    protocols: tuple[str, ...] = ()
    extra_outputs: Callable[[str, EvalSet, dict, EvalFiles], dict[str, str]] = field(default=no_extra_outputs)
    images_from_annotations: bool = False

    @property
    def embeds_images(self) -> bool:
        return not self.images


def refuse(files: EvalFiles, task: str, allowed: set[str]) -> None:
    """A ValueError naming the given files that `task` does not take."""
    names = {"annotations": files.annotations, "questions": files.questions, "ocr": files.ocr,
             "test_questions": files.test_questions, "protocol": files.protocol}
    extra = [n for n, v in names.items() if v and n not in allowed]
    if extra:
        flags = ", ".join("--" + n.replace("_", "-") for n in extra)
        raise ValueError(f"{task} takes no {flags}")
