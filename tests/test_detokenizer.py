"""serve.detokenizer: incremental detokenization streams exactly what re-decoding the whole output gave.

The reference (`_old_events`) is the engine's earlier method, kept here verbatim: every token re-decodes
the whole output, searches the stop sequences near the end and holds back an incomplete UTF-8
character or a possible stop sequence's beginning. The engine's `_accept` (through its
`IncrementalDetokenizer`) must give the same events, token by token, for the project's byte-level
BPE tokenizers, whose tokens split multi-byte characters.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from serve.detokenizer import IncrementalDetokenizer, held_back, skipped_token_ids
from serve.engine import BatchEngine, GenerationRequest, SamplingParams

TEXTS = [
    "Hello, world! The red circle is at the top left.",
    "héllo wörld, naïve café, crème brûlée, Ærøskøbing, Ångström",
    "日本語のテキストと中文字符，还有한국어 문장。",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and 🎉🎉🎉!",
    "   \n  leading whitespace then text\n\nwith\tblank lines  ",
    "Ελληνικά και русский текст, עברית, العربية",
    "mixed😀a😀b世c界d é e ü f",
    "math ∑∫√∞ ≠ ≤ ≥ — “quotes” ‘single’ … •",
    "    deeply    indented      code():\n        return {'a': 1}",
    "🙂",
    "",
]
ALPHABET = (list("abcdefgh xyz,.!?\n\t") + list("éüñçøß") + list("世界中文日本")
            + ["😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "€", "∑"])


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(params=["tiny", "olmo"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _old_events(tokenizer, tokens, stops=(), max_tokens=None, ignore_eos=False):
    """The engine's earlier `_accept` (a whole re-decode per token): [(delta, finish_reason)], one per token."""
    stops = list(stops)
    max_tokens = max_tokens or len(tokens)
    text_ids, emitted, events = [], 0, []
    for n, token in enumerate(tokens, 1):
        finish = None
        if token == tokenizer.eos_token_id and not ignore_eos:
            finish = "stop"
        else:
            text_ids.append(token)
            if n >= max_tokens:
                finish = "length"
        full = _decode(tokenizer, text_ids).lstrip()
        visible = len(full)
        if stops:
            start = max(0, emitted - max(len(s) for s in stops))
            hits = [i for i in (full.find(s, start) for s in stops) if i >= 0]
            if hits:
                finish, visible = "stop", min(hits)
        if finish is None:
            visible = len(full.rstrip("\ufffd"))
            visible -= held_back(full[:visible], stops)
        delta = full[emitted:visible] if visible > emitted else ""
        emitted += len(delta)
        events.append((delta, finish))
        if finish is not None:
            break
    return events


def _engine(tokenizer):
    model = SimpleNamespace(config=SimpleNamespace(max_sequence_length=1 << 20))
    return BatchEngine(model, tokenizer)


def _engine_events(tokenizer, tokens, stops=(), max_tokens=None, ignore_eos=False, engine=None):
    """The engine's `_accept` for `tokens` as if sampled one by one: [(delta, finish_reason)]."""
    engine = engine or _engine(tokenizer)
    seq = engine.submit(GenerationRequest([1], SamplingParams(max_tokens=max_tokens or len(tokens),
                                                              stop=list(stops), ignore_eos=ignore_eos)))
    events = []
    for token in tokens:
        event = engine._accept(seq, token)
        seq.length += 1
        events.append((event.text, event.finish_reason))
        assert event.completion_tokens == len(events)
        if event.finish_reason is not None:
            break
    return events


def _text(events) -> str:
    return "".join(delta for delta, _ in events)


def _splits_characters(tokenizer, text) -> bool:
    return any("\ufffd" in _decode(tokenizer, [i]) for i in tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------- whole decode, no stops


def test_the_texts_split_multibyte_characters_across_tokens(tokenizer):
    assert sum(_splits_characters(tokenizer, t) for t in TEXTS + _random_texts(0, 20)) >= 5


@pytest.mark.parametrize("eos", [False, True])
def test_deltas_concatenate_to_the_full_decode(tokenizer, eos):
    for text in TEXTS + _random_texts(1, 60):
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens = ids + [tokenizer.eos_token_id] if eos else ids
        if not tokens:
            continue
        events = _engine_events(tokenizer, tokens)
        assert _text(events) == _decode(tokenizer, ids).lstrip(), text
        assert events == _old_events(tokenizer, tokens), text
        assert [f for _, f in events] == [None] * (len(tokens) - 1) + ["stop" if eos else "length"]


def test_the_detokenizer_alone_matches_decode_id_by_id(tokenizer):
    for text in TEXTS + _random_texts(2, 40):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for strip in (True, False):
            detok = IncrementalDetokenizer(tokenizer, strip_leading_whitespace=strip)
            parts = [detok.add(i).text for i in ids]
            parts.append(detok.finish().text)
            want = _decode(tokenizer, ids)
            assert "".join(parts) == (want.lstrip() if strip else want)
            assert not any("\ufffd" in p for p in parts)  # no incomplete character is ever sent


def test_random_token_ids_match_the_old_method(tokenizer):
    """Arbitrary ids: invalid UTF-8, special tokens in the middle, text that starts with whitespace."""
    rng = random.Random(3)
    vocab = len(tokenizer)
    specials = sorted(set(tokenizer.all_special_ids))
    for _ in range(60):
        tokens = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab)
                  for _ in range(rng.randint(1, 30))]
        for ignore_eos in (False, True):
            events = _engine_events(tokenizer, tokens, ignore_eos=ignore_eos)
            assert events == _old_events(tokenizer, tokens, ignore_eos=ignore_eos), tokens
        text_ids = [t for t in tokens if t != tokenizer.eos_token_id]
        if tokenizer.eos_token_id not in tokens:
            assert _text(events) == _decode(tokenizer, text_ids).lstrip()


# --------------------------------------------------------------------------- stop sequences


def _cut(text: str, stop: str) -> str:
    i = text.find(stop)
    return text if i < 0 else text[:i]


def test_a_stop_sequence_cuts_the_full_decode_and_is_not_sent(tokenizer):
    rng = random.Random(4)
    checked = spanning = 0
    for text in TEXTS + _random_texts(5, 60):
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = _decode(tokenizer, ids).lstrip()
        if len(full) < 3:
            continue
        for _ in range(4):
            a = rng.randrange(len(full) - 1)
            stop = full[a:a + rng.randint(1, 5)]
            events = _engine_events(tokenizer, ids, [stop])
            assert _text(events) == _cut(full, stop), (text, stop)
            assert events[-1][1] == "stop" and events == _old_events(tokenizer, ids, [stop]), (text, stop)
            checked += 1
            # the stop sequence spans a token boundary: no token's own text contains it
            spanning += not any(stop in _decode(tokenizer, [i]) for i in ids) and len(stop) > 1
    assert checked > 100 and spanning > 20


@pytest.mark.parametrize("text, stop", [
    ("I like café au lait", "é"),  # the stop is a character split across tokens
    ("smile 😀 please", "😀"),
    ("smile 😀 please", "e 😀"),  # ascii + a split emoji
    ("flags 🇫🇷🇩🇪 here", "🇩🇪"),
    ("世界中文日本", "文日"),
    ("a 👍🏽 b", "🏽"),  # a modifier: its bytes come only after another emoji's
    ("   \n  Hello world", "  H"),  # only inside the stripped leading whitespace: never found
    ("aaab", "ab"),  # a held-back prefix that overlaps itself
    ("xyxyxz", "xyxz"),
    ("no stop here 😀", "😁"),  # shares leading bytes with the text's emoji only
])
def test_stop_sequences_at_multibyte_boundaries(tokenizer, text, stop):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = _decode(tokenizer, ids).lstrip()
    for tokens in (ids, ids + [tokenizer.eos_token_id]):
        events = _engine_events(tokenizer, tokens, [stop])
        assert events == _old_events(tokenizer, tokens, [stop])
        assert _text(events) == _cut(full, stop)
        if stop in full:
            assert events[-1][1] == "stop"
            assert all(stop not in delta for delta, _ in events)


def test_several_stops_and_held_back_text(tokenizer):
    text = "The answer is 42. 答案是四十二。😀 The end."
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = _decode(tokenizer, ids)
    stop_sets = [["never", "。😀"], ["42.", "答案"], ["The end.", "The answer is 42. 答"], ["é", "😀 T"],
                 ["d.", "x" * 30], ["四十", "十二"], ["answer is 42. 答案是四十二。😀 The en"]]
    for stops in stop_sets:
        for max_tokens in (len(ids), len(ids) // 2):
            events = _engine_events(tokenizer, ids, stops, max_tokens=max_tokens)
            assert events == _old_events(tokenizer, ids, stops, max_tokens=max_tokens), stops
            hits = [i for i in (full.find(s) for s in stops) if i >= 0]
            if max_tokens == len(ids) and hits:
                assert _text(events) == full[:min(hits)], stops
    # text that may begin a stop sequence is held back until it is known, then sent
    detok = IncrementalDetokenizer(tokenizer, ["abcz"])
    sent = [detok.add(i).text for i in tokenizer.encode("xx abc", add_special_tokens=False)]
    assert "".join(sent) == "xx " and detok.finish() == ("abc", False)


def test_random_stops_match_the_old_method_exactly(tokenizer):
    rng = random.Random(6)
    for text in _random_texts(7, 80):
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = _decode(tokenizer, ids)
        stops = [full[a:a + rng.randint(1, 6)] for a in rng.sample(range(len(full)), min(len(full), rng.randint(1, 3)))]
        stops += rng.sample(["😀", "é", "\n", "世界", "zz", " a"], 2)
        tokens = ids + ([tokenizer.eos_token_id] if rng.random() < 0.5 else [])
        max_tokens = rng.randint(1, len(tokens))
        assert _engine_events(tokenizer, tokens, stops, max_tokens) == \
            _old_events(tokenizer, tokens, stops, max_tokens), (text, stops)


# --------------------------------------------------------------------------- end of sequence and special tokens


def test_eos_and_special_tokens_as_the_engine_handles_them(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("smile 😀", add_special_tokens=False)
    # eos ends the request: finish "stop", its text never shown; an incomplete character is flushed as U+FFFD
    events = _engine_events(tokenizer, ids[:-1] + [eos])
    assert events[-1][1] == "stop" and _text(events) == _decode(tokenizer, ids[:-1]).lstrip()
    assert _text(events).endswith("\ufffd")
    # ignore_eos: eos is one more token; decoded with skip_special_tokens=True like the rest
    tokens = ids[:3] + [eos] * 5 + ids[3:]
    events = _engine_events(tokenizer, tokens, ignore_eos=True)
    assert events == _old_events(tokenizer, tokens, ignore_eos=True)
    assert _text(events) == _decode(tokenizer, tokens).lstrip() and events[-1][1] == "length"
    # special tokens inside the text are skipped, even between the bytes of one character
    pad = tokenizer.pad_token_id
    mixed = [pad] + ids[:-2] + [pad, pad] + ids[-2:]
    assert _text(_engine_events(tokenizer, mixed)) == _decode(tokenizer, ids).lstrip()
    assert pad in skipped_token_ids(tokenizer)
    assert all(_decode(tokenizer, [i]) == "" for i in skipped_token_ids(tokenizer))
    assert skipped_token_ids(tokenizer, skip_special_tokens=False) == frozenset()


def test_max_tokens_flushes_what_is_held_back(tokenizer):
    ids = tokenizer.encode("abc 😀", add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        events = _engine_events(tokenizer, ids, ["c 😀x"], max_tokens=n)
        assert events == _old_events(tokenizer, ids, ["c 😀x"], max_tokens=n)
        assert _text(events) == _decode(tokenizer, ids[:n]) and events[-1][1] == "length"


def test_a_finished_detokenizer_takes_no_more_tokens(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer, ["b"])
    assert detok.add(tiny_tokenizer.convert_tokens_to_ids("a")) == ("a", False)
    assert detok.add(tiny_tokenizer.convert_tokens_to_ids("b")) == ("", True)
    with pytest.raises(RuntimeError):
        detok.add(0)


# --------------------------------------------------------------------------- bounded work per token


class CountingTokenizer:
    """Delegates to a tokenizer; records the number of ids of every decode call."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.decoded: list[int] = []

    def decode(self, ids, **kwargs):
        self.decoded.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("stops", [[], ["never-appears", "😀😀😀x"]])
def test_work_per_token_is_bounded(tokenizer, stops):
    text = " ".join(TEXTS[:8]) * 4
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 400
    counting = CountingTokenizer(tokenizer)
    engine = _engine(counting)
    counting.decoded.clear()
    events = _engine_events(counting, ids, stops, engine=engine)
    assert _text(events) == _decode(tokenizer, ids).lstrip()
    assert len(counting.decoded) <= 2 * len(ids)
    assert max(counting.decoded[400:]) <= 16  # a window of recent ids, not the whole output
    detok = IncrementalDetokenizer(counting, stops)
    for i in ids:
        detok.add(i)
    assert len(detok._ids) <= 64 + 16 and len(detok._text) <= 64  # what it keeps does not grow either
    # a benchmark's ignore_eos run of eos tokens does not grow the window
    counting.decoded.clear()
    events = _engine_events(counting, ids[:20] + [tokenizer.eos_token_id] * 300, stops, ignore_eos=True,
                            engine=engine)
    assert len(counting.decoded) <= 2 * 320 and max(counting.decoded[40:], default=0) <= 16  # tiny: eos is skipped
