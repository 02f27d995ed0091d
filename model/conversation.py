"""Conversation templates of LLaVA-1.5: `plain` (feature alignment) and `v1` (instruction tuning).

Source: LLaVA's `llava/conversation.py` (`conv_llava_plain`, `conv_vicuna_v1`) and
`llava/train/train.py` (`preprocess_plain`, `preprocess_v1`, `preprocess_multimodal`).

- plain: `<image>` + caption + "\\n"; the human turn's text is dropped, only the caption (and "\\n")
  is supervised.
- v1: system prompt, then `USER: <msg> ASSISTANT: <answer><eos>` per round; a single `<image>` in a
  human turn is moved to its front followed by "\\n". Labels keep assistant answers and their
  closing eos (sep2); everything else is -100.

Labels are derived from character spans of the rendered text and the tokenizer's offsets, so a
token that straddles an answer boundary (a tokenizer merging prompt and answer text) is detected
as a mismatch instead of silently shifting the mask. The `<image>` token is then expanded to one
position per image patch.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.tokenizer import IMAGE_TOKEN, image_token_id

IGNORE_INDEX = -100
TEMPLATES = ("plain", "v1")
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


class ConversationError(ValueError):
    """A record that cannot become a training sample; `reason` is a short machine-readable kind."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Segment:
    text: str
    target: bool


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    num_images: int


def check_conversations(conversations, num_images: int) -> None:
    """Validate LLaVA's `conversations` list: alternating human/gpt, strings, placeholders matching images."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("malformed_record", "conversations must be a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise ConversationError(
                "malformed_record", f"turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}"
            )
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ConversationError("malformed_record", f"turn {i} is from {turn['from']!r}, expected {expected!r}")
        if turn["from"] == "gpt" and IMAGE_TOKEN in turn["value"]:
            raise ConversationError("image_placeholder_mismatch", f"turn {i} (gpt) holds an {IMAGE_TOKEN} placeholder")
    answers = [t["value"] for t in conversations if t["from"] == "gpt"]
    if not answers or any(not a.strip() for a in answers):
        raise ConversationError("empty_answer", "every gpt turn needs a non-empty answer")
    placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in conversations)
    if placeholders != num_images:
        raise ConversationError(
            "image_placeholder_mismatch", f"{placeholders} {IMAGE_TOKEN} placeholders for {num_images} images"
        )


def _human_text(value: str) -> str:
    # LLaVA's preprocess_multimodal: a lone <image> goes first, on its own line.
    if value.count(IMAGE_TOKEN) == 1:
        return IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()
    return value


def render(conversations, template: str, eos: str, add_generation_prompt: bool = False) -> list[Segment]:
    """Conversation -> text segments, each marked supervised or not.

    With `add_generation_prompt`, the conversation ends with a human turn and the rendering ends
    where the assistant's answer begins (the inference prompt).
    """
    if template == "plain":
        images = IMAGE_TOKEN * conversations[0]["value"].count(IMAGE_TOKEN)
        segments = [Segment(images, False)]
        if not add_generation_prompt:
            segments.append(Segment(conversations[1]["value"].strip() + "\n", True))
        return segments
    if template == "v1":
        segments = [Segment(V1_SYSTEM + " ", False)]
        for turn in conversations:
            if turn["from"] == "human":
                segments.append(Segment(f"USER: {_human_text(turn['value'])} ASSISTANT:", False))
            else:
                segments.append(Segment(" ", False))
                segments.append(Segment(turn["value"].strip() + eos, True))
        return segments
    raise ValueError(f"unknown conversation template {template!r}; choose one of {TEMPLATES}")


def _label_tokens(text: str, target_chars: list[bool], offsets, ids) -> list[int]:
    labels = []
    for token_id, (start, end) in zip(ids, offsets):
        span = range(start, max(end, start + 1))
        solid = [i for i in span if i < len(text) and not text[i].isspace()] or [start]
        inside = {target_chars[i] for i in solid if i < len(text)}
        if len(inside) > 1:
            raise ConversationError(
                "tokenization_mismatch", f"token {text[start:end]!r} straddles an answer boundary"
            )
        labels.append(token_id if inside == {True} else IGNORE_INDEX)
    return labels


def tokenize_conversation(
    conversations,
    tokenizer,
    template: str,
    num_images: int,
    num_image_tokens: int,
    max_length: int,
) -> TokenizedSample:
    """LLaVA conversation -> input_ids and labels, `<image>` expanded to `num_image_tokens` positions.

    Sequences longer than `max_length` are truncated; a sample whose truncation would cut an image
    or leave no supervised token is rejected (`ConversationError` with reason `too_long`).
    """
    check_conversations(conversations, num_images)
    if template == "plain" and (len(conversations) != 2 or num_images == 0):
        raise ConversationError("malformed_record", "the plain template needs one human turn with <image> and one answer")
    segments = render(conversations, template, tokenizer.eos_token)
    text = "".join(s.text for s in segments)
    target_chars = [flag for s in segments for flag in [s.target] * len(s.text)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = _label_tokens(text, target_chars, enc["offset_mapping"], enc["input_ids"])

    image_id = image_token_id(tokenizer)
    input_ids, full_labels = [], []
    for token_id, label in zip(enc["input_ids"], labels):
        if token_id == image_id:
            input_ids.extend([image_id] * num_image_tokens)
            full_labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            input_ids.append(token_id)
            full_labels.append(label)
    if input_ids.count(image_id) != num_images * num_image_tokens:
        raise ConversationError("tokenization_mismatch", f"the tokenizer split {IMAGE_TOKEN}; add it as a special token")

    if len(input_ids) > max_length:
        kept = input_ids[:max_length]
        if kept.count(image_id) != num_images * num_image_tokens:
            raise ConversationError("too_long", f"{len(input_ids)} tokens; truncating to {max_length} would cut an image")
        input_ids, full_labels = kept, full_labels[:max_length]
    if all(label == IGNORE_INDEX for label in full_labels):
        raise ConversationError("too_long", f"no answer token within max_length {max_length}")
    return TokenizedSample(input_ids=input_ids, labels=full_labels, num_images=num_images)


def prompt_ids(conversations, tokenizer, template: str, num_images: int, num_image_tokens: int) -> list[int]:
    """Inference prompt ids: the conversation (ending with a human turn) up to where the answer starts."""
    if not conversations or conversations[-1].get("from") != "human":
        raise ValueError("a prompt conversation must end with a human turn")
    check_conversations(conversations + [{"from": "gpt", "value": "x"}], num_images)
    text = "".join(s.text for s in render(conversations, template, tokenizer.eos_token, add_generation_prompt=True))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = image_token_id(tokenizer)
    out: list[int] = []
    for token_id in ids:
        out.extend([token_id] * (num_image_tokens if token_id == image_id else 1))
    return out
