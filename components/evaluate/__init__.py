"""Evaluation: POPE, VQAv2 and TextVQA, scored as their official scripts score them.

- `answer_processing`: EvalAI's answer normalisation (the tables and regexes of the VQA scripts).
- `scoring`: VQA accuracy (leave-one-out over the human answers) and POPE's yes/no metrics.
- `datasets`: loaders of the official question/annotation files.
- `predictions`: reading, checking and writing result files in the official formats.
- `inference`: batched greedy generation with the short-answer prompt.
- `run`: `bitllava eval run` (Ray Data batch inference, scoring, MLflow).
- `synthetic_sets`: small generated sets in the official formats (tests, the demo).
"""
