"""Templates and label masks on OLMo's real tokenizer (and the tiny one)."""

import pytest

from model.conversation import IGNORE_INDEX, V1_SYSTEM, ConversationError, prompt_ids, tokenize_conversation

IMG_TOKENS = 4


def targets(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, l in zip(sample.input_ids, sample.labels) if l != IGNORE_INDEX])


def spans(sample) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate(sample.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_plain_template_masks_all_but_caption(olmo_tokenizer):
    conv = [{"from": "human", "value": "Provide a brief description of the given image.\n<image>"},
            {"from": "gpt", "value": "olive oil is a healthy ingredient used liberally ."}]
    s = tokenize_conversation(conv, olmo_tokenizer, "plain", 1, IMG_TOKENS, 64)
    image_id = olmo_tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == 50280
    assert s.input_ids[:IMG_TOKENS] == [image_id] * IMG_TOKENS
    # the instruction text is dropped; only caption + "\n" is supervised
    assert olmo_tokenizer.decode(s.input_ids[IMG_TOKENS:]) == "olive oil is a healthy ingredient used liberally .\n"
    assert s.labels[:IMG_TOKENS] == [IGNORE_INDEX] * IMG_TOKENS
    assert s.labels[IMG_TOKENS:] == s.input_ids[IMG_TOKENS:]


def test_v1_template_masks_everything_but_answers_and_eos(olmo_tokenizer):
    conv = [{"from": "human", "value": "What is on the table?\n<image>"},
            {"from": "gpt", "value": "A bowl of fruit."},
            {"from": "human", "value": "How many apples?"},
            {"from": "gpt", "value": "Three."}]
    s = tokenize_conversation(conv, olmo_tokenizer, "v1", 1, IMG_TOKENS, 512)
    eos = "|||IP_ADDRESS|||"
    text = olmo_tokenizer.decode(s.input_ids)
    assert text == (
        f"{V1_SYSTEM} USER: " + "<image>" * IMG_TOKENS + "\nWhat is on the table? ASSISTANT: A bowl of fruit."
        + eos + "USER: How many apples? ASSISTANT: Three." + eos
    )
    runs = spans(s)
    assert len(runs) == 2
    assert [olmo_tokenizer.decode(s.input_ids[a:b]) for a, b in runs] == [" A bowl of fruit." + eos, " Three." + eos]
    assert s.input_ids[runs[0][1] - 1] == 50279 and s.input_ids[runs[1][1] - 1] == 50279
    assert targets(olmo_tokenizer, s) == " A bowl of fruit." + eos + " Three." + eos


def test_v1_on_the_tiny_tokenizer(tiny_tokenizer):
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
    s = tokenize_conversation(conv, tiny_tokenizer, "v1", 1, IMG_TOKENS, 512)
    assert targets(tiny_tokenizer, s) == " red<|endoftext|>"


def test_truncation_keeps_images_and_rejects_lost_answers(olmo_tokenizer):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * 200}]
    s = tokenize_conversation(conv, olmo_tokenizer, "v1", 1, IMG_TOKENS, 80)
    assert len(s.input_ids) == 80 and len(s.labels) == 80
    with pytest.raises(ConversationError, match="too_long.*no answer token"):
        tokenize_conversation(conv, olmo_tokenizer, "v1", 1, IMG_TOKENS, 40)
    with pytest.raises(ConversationError, match="too_long.*cut an image"):
        tokenize_conversation(conv, olmo_tokenizer, "v1", 1, 100, 60)


@pytest.mark.parametrize(
    "conv, num_images, reason",
    [
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], 1, "image_placeholder_mismatch"),
        ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], 1, "image_placeholder_mismatch"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x <image>"}], 2, "image_placeholder_mismatch"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "   "}], 1, "empty_answer"),
        ([{"from": "human", "value": "<image>"}], 1, "empty_answer"),
        ([{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "x"}], 1, "malformed_record"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], 0, "malformed_record"),
        ("not a list", 0, "malformed_record"),
        ([], 0, "malformed_record"),
    ],
)
def test_bad_conversations_name_their_reason(olmo_tokenizer, conv, num_images, reason):
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(conv, olmo_tokenizer, "v1", num_images, IMG_TOKENS, 256)
    assert err.value.reason == reason


def test_tokenization_mismatch_is_detected(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer.__class__.from_str(
        tiny_tokenizer.backend_tokenizer.to_str()), eos_token="<|endoftext|>", pad_token="<|padding|>")
    tok.add_tokens(["ASSISTANT: red"])  # a token that merges prompt and answer text
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(conv, tok, "v1", 1, IMG_TOKENS, 256)
    assert err.value.reason == "tokenization_mismatch"


def test_unknown_template(olmo_tokenizer):
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'"):
        tokenize_conversation([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
                              olmo_tokenizer, "chatml", 0, IMG_TOKENS, 64)


def test_prompt_is_the_training_prefix(olmo_tokenizer):
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue."}]
    sample = tokenize_conversation(conv, olmo_tokenizer, "v1", 1, IMG_TOKENS, 256)
    prompt = prompt_ids(conv[:1], olmo_tokenizer, "v1", 1, IMG_TOKENS)
    first_target = spans(sample)[0][0]
    assert sample.input_ids[:first_target] == prompt
