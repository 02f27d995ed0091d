"""EvalAI answer normalisation, as the VQA and TextVQA evaluation scripts apply it.

Source: `EvalAIAnswerProcessor` of facebookresearch/mmf (`pythia/tasks/processors.py`), shipped by
LLaVA as `llava/eval/m4c_evaluator.py` and used there for TextVQA scoring and for VQAv2 result
files (`convert_vqav2_for_submission.py`); its tables and regexes are those of the VQA evaluation
script (GT-Vision-Lab/VQA `vqaEval.py`, Cloud-CV/VQA-Evaluation), with ASCII apostrophes.

`normalize_answer(text)` runs, in order:
1. `word_tokenize`: lower-case; delete every "," and "?"; "'s" -> " 's"; strip.
2. newlines and tabs -> spaces; strip.
3. `process_punctuation`: each mark of `PUNCTUATIONS` is deleted when it touches a space somewhere
   in the text (or when the text holds a comma between digits, `COMMA_STRIP`), else replaced by a
   space; then `PERIOD_STRIP` deletes periods not followed by a digit ("3.5" keeps its period).
4. `process_digit_article`: split on whitespace, number words -> digits (`NUMBER_MAP`), drop
   articles, expand `CONTRACTIONS`, join with single spaces.

The quirks of the original are kept on purpose, because scores must match the official ones:
the `(?!<=\\d)` of `PERIOD_STRIP` is a look-ahead (not a look-behind), `re.UNICODE` is passed as
the `count` of `re.sub` (so at most 32 periods are removed), and the contraction keys spelled
with a capital "I" can never match lower-cased words.
"""

from __future__ import annotations

import re

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# the VQA script's `manualMap`
NUMBER_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = ("a", "an", "the")

PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = (
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)


def word_tokenize(text: str) -> str:
    """Lower-case, delete commas and question marks, split off the possessive "'s"."""
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation, then strip periods that are not decimal points."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATIONS:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # the official call is `sub("", out, re.UNICODE)`: re.UNICODE (32) lands in `count`
    return PERIOD_STRIP.sub("", out, int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """Number words to digits, articles dropped, contractions restored; words joined by one space."""
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """EvalAI's full normalisation of one answer (`EvalAIAnswerProcessor.__call__`)."""
    text = word_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    return process_digit_article(text)
