"""The prompts of LLaVA-1.5's evaluation (`docs/Evaluation.md` and the question files of
`scripts/v1_5/eval/*.sh`, haotian-liu/LLaVA at c121f04).

- Short answer (VQAv2, GQA, TextVQA, POPE, MME): `<question>\\nAnswer the question using a single word or phrase.`
- TextVQA with OCR (`llava_textvqa_val_v051_ocr.jsonl`): `<question>\\nReference OCR token: <t1>, <t2>, ...`
  then the short-answer line; an image without OCR tokens gets the plain short-answer prompt.
- Multiple choice (ScienceQA, SEED-Bench, MMBench): the question, one `<letter>. <option>` line per
  option, then `Answer with the option's letter from the given choices directly.`; ScienceQA puts
  `Context: <hint>\\n` before the question (`llava_test_CQM-A.json`), MMBench puts `<hint>\\n`
  (`llava/eval/model_vqa_mmbench.py`).

The image placeholder goes before the text (`model.chat.user_turn`), as LLaVA's `<image>\\n` + prompt.
Pure string functions: no torch, safe to import anywhere.
"""

from __future__ import annotations

import string

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
OCR_PREFIX = "\nReference OCR token: "
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


def short_answer_prompt(question: str) -> str:
    return question + SHORT_ANSWER_SUFFIX


def ocr_prompt(question: str, tokens: list[str]) -> str:
    """LLaVA-1.5's TextVQA prompt: the question, the Rosetta OCR tokens, the short-answer line."""
    if not tokens:
        return short_answer_prompt(question)
    return question + OCR_PREFIX + ", ".join(tokens) + SHORT_ANSWER_SUFFIX


def strip_short_answer(text: str) -> str:
    """A LLaVA question-file `text` back to its question (the short-answer line and OCR line removed)."""
    if text.endswith(SHORT_ANSWER_SUFFIX):
        text = text[: -len(SHORT_ANSWER_SUFFIX)]
    return text.split(OCR_PREFIX, 1)[0]


def multiple_choice_prompt(question: str, options: list[str], prefix: str = "") -> str:
    """`prefix` (a hint or context line, with its newline) + question + lettered options + the letter instruction."""
    lines = "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return prefix + question + lines + MULTIPLE_CHOICE_SUFFIX
