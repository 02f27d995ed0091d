"""Evaluation as the field runs it: LLaVA-1.5's protocols for POPE, VQAv2, TextVQA, GQA, ScienceQA-IMG,
MME, SEED-Bench and MMBench, each scored as its official script scores it.

- `tasks/`: one module per benchmark (published files, prompt, result format, scoring rules) and the
  table of them (`tasks.TASKS`).
- `prompts`: LLaVA-1.5's short-answer, OCR-token and multiple-choice prompts.
- `answer_processing`: EvalAI's answer normalisation (the tables and regexes of the VQA scripts).
- `scoring`: VQA accuracy (leave-one-out over the human answers), POPE's yes/no metrics, `eval score`.
- `datasets`: the question and set types every loader fills, and the helpers they share.
- `predictions`: reading, checking and matching result files; the shared JSON shapes.
- `inference`: batched greedy generation.
- `run`: `bitllava eval run` (Ray Data batch inference, scoring, MLflow).
- `synthetic_sets`: small generated sets of every task in the published layouts (tests, `data synth`).
"""
