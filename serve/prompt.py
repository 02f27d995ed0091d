"""OpenAI chat messages -> the model's prompt ids (model.conversation templates) and its images.

- `user` messages become human turns; each `image_url` part becomes an `<image>` placeholder where
  it stands among the text parts (a single image goes first, as in training: LLaVA's v1 template).
- `assistant` messages become gpt turns (text only): earlier answers of a multi-turn chat.
- `system` / `developer` messages: the model was trained with the fixed v1 system prompt, so
  their text is put in front of the first user message (as chat templates of models without a
  system role do).
- Consecutive messages of one role are joined with a newline; the chat must end with a user message.
- A literal `<image>` in text is refused: images are placed by `image_url` parts only.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.conversation import ConversationError, prompt_ids
from model.tokenizer import IMAGE_TOKEN
from serve.errors import bad_request
from serve.openai_schema import ImagePart, Message


@dataclass
class ImageRef:
    url: str
    param: str  # where it is in the request, e.g. "messages[0].content[1].image_url"


@dataclass
class ChatPrompt:
    conversations: list[dict]  # LLaVA's [{"from": "human"|"gpt", "value": ...}]
    images: list[ImageRef]


def _text(value: str, param: str) -> str:
    if IMAGE_TOKEN in value:
        raise bad_request(f"text may not contain the literal {IMAGE_TOKEN} placeholder; send images as image_url parts",
                          "invalid_content", param)
    return value


def parse_messages(messages: list[Message]) -> ChatPrompt:
    """Messages -> LLaVA conversation turns and the image references in order of appearance."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}].content"
        content = message.content
        if message.role in ("system", "developer", "assistant"):
            if content is None:
                raise bad_request(f"{message.role} messages need text content", "invalid_content", param)
            if not isinstance(content, str):
                if any(isinstance(p, ImagePart) for p in content):
                    raise bad_request(f"{message.role} messages may hold text only; images go in user messages",
                                      "invalid_content", param)
                content = "".join(p.text for p in content)
            text = _text(content, param)
            if message.role == "assistant":
                turns.append(("gpt", text))
            elif turns:
                raise bad_request("system messages must come before the conversation", "invalid_content",
                                  f"messages[{i}]")
            else:
                system.append(text)
            continue
        if content is None:
            raise bad_request("user messages need content", "invalid_content", param)
        if isinstance(content, str):
            value = _text(content, param)
        else:
            pieces = []
            for j, part in enumerate(content):
                if isinstance(part, ImagePart):
                    images.append(ImageRef(part.image_url.url, f"{param}[{j}].image_url"))
                    pieces.append(IMAGE_TOKEN)
                else:
                    pieces.append(_text(part.text, f"{param}[{j}].text"))
            value = "".join(pieces)
        turns.append(("human", value))

    merged: list[dict] = []
    for role, value in turns:
        if merged and merged[-1]["from"] == role:
            merged[-1]["value"] += "\n" + value
        else:
            merged.append({"from": role, "value": value})
    if not merged or merged[0]["from"] != "human":
        raise bad_request("the conversation must start with a user message", "invalid_messages", "messages")
    if merged[-1]["from"] != "human":
        raise bad_request("the conversation must end with a user message", "invalid_messages", "messages")
    if system:
        merged[0]["value"] = "\n".join(system) + "\n\n" + merged[0]["value"]
    for turn in merged:
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise bad_request("assistant messages must not be empty", "invalid_messages", "messages")
    return ChatPrompt(merged, images)


def render_prompt(chat: ChatPrompt, tokenizer, template: str, num_image_tokens: int) -> list[int]:
    """Prompt ids of the conversation, each image expanded to `num_image_tokens` positions."""
    try:
        return prompt_ids(chat.conversations, tokenizer, template, len(chat.images), num_image_tokens)
    except ConversationError as err:
        raise bad_request(f"the messages do not form a valid conversation: {err}", "invalid_messages",
                          "messages") from err
