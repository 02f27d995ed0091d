"""Incremental detokenization of one generated sequence, with stop sequences and hold-back.

Source: the method of vLLM's detokenizer (vllm/transformers_utils/detokenizer_utils.py,
`detokenize_incrementally`; the same idea as transformers' `TextStreamer`): keep two offsets into
the token ids, `prefix` and `read`. Each new token decodes only the window `ids[prefix:]` and the
window's already-read part `ids[prefix:read]`; the text the new tokens add is the difference. When
that text ends with U+FFFD (the bytes of a UTF-8 character split across byte-level BPE tokens are
not all there yet) the offsets stay put, so the window grows until the character is whole; else
`prefix, read = read, len(ids)`. Work per token is bounded by the window, not by the output's
length, so a long output no longer costs a re-decode of everything at every token.

The emitted text is exactly what re-decoding the whole output at every token gave (the engine's
earlier method): `decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` with
its leading whitespace stripped, streamed as deltas, where a delta

- stops before the first stop sequence found; the stop sequence itself is never sent;
- holds back trailing U+FFFD characters (an incomplete UTF-8 character) and the longest suffix
  that begins some stop sequence (it may yet become one), until they are known;
- at the end of the sequence (`final=True` / `finish()`) flushes everything held back.

Stop sequences are searched only in the text not yet emitted plus the last `max(len(stop))`
characters already emitted (the same window as before; no stop sequence can begin earlier).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

REPLACEMENT = "\ufffd"  # what the byte-level decoder makes of an incomplete UTF-8 sequence
_TRIM_IDS = 64  # drop consumed ids from the front once this many have piled up


class DetokenizerStep(NamedTuple):
    """text: characters newly made visible (may be empty); stopped: a stop sequence was found."""

    text: str
    stopped: bool


def skipped_token_ids(tokenizer, skip_special_tokens: bool = True) -> frozenset[int]:
    """Ids that `tokenizer.decode(..., skip_special_tokens)` drops, so leaving them out changes nothing.

    Checked one by one (a tokenizer's "special" tokens are not all skipped: OLMo's eos is not).
    """
    if not skip_special_tokens:
        return frozenset()
    candidates = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    candidates |= {i for i, token in decoder.items() if getattr(token, "special", False)}
    return frozenset(i for i in candidates
                     if tokenizer.decode([i], skip_special_tokens=True, clean_up_tokenization_spaces=False) == "")


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that begins some stop sequence (it may yet become one)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids, fed one at a time, into text deltas (see the module docstring).

    `add(token_id, final=False)` -> DetokenizerStep(text, stopped); `finish()` -> DetokenizerStep at the end
    of the sequence without a new text token (end-of-sequence). Once `stopped` or final, feed nothing more.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = (), *, skip_special_tokens: bool = True,
                 strip_leading_whitespace: bool = True, skipped_ids: frozenset[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.skip_special_tokens = skip_special_tokens
        self.strip_leading_whitespace = strip_leading_whitespace
        self._skipped = skipped_token_ids(tokenizer, skip_special_tokens) if skipped_ids is None else skipped_ids
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._ids: list[int] = []  # the window's ids (consumed ones dropped now and then); skipped ids left out
        self._prefix = 0  # ids[prefix:read] decode to text already read, the context of the next decode
        self._read = 0
        self._text = ""  # read text from absolute position `_base` on (the stop-search window and held-back text)
        self._base = 0
        self._read_chars = 0  # absolute length of the read text
        self._tentative = ""  # text of ids[read:]: ends with U+FFFD (or is empty), may still change
        self.emitted = 0  # characters sent so far
        self.done = False

    # ------------------------------------------------------------------ public

    def add(self, token_id: int, final: bool = False) -> DetokenizerStep:
        """Feed the next generated token; `final`: it is the sequence's last (flush what is held back)."""
        if self.done:
            raise RuntimeError("the sequence is finished")
        if token_id not in self._skipped:
            self._ids.append(token_id)
            self._decode_new()
        return self._emit(final)

    def finish(self) -> DetokenizerStep:
        """The sequence ended with no further text token: flush what is held back (a stop may still cut it)."""
        if self.done:
            raise RuntimeError("the sequence is finished")
        return self._emit(final=True)

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_new(self) -> None:
        """vLLM's `detokenize_incrementally`: read the new tokens' text unless it ends in an incomplete character."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            self._tentative = ""
            self._append_read(new_text[len(prefix_text):])
            if self._prefix >= _TRIM_IDS:
                del self._ids[:self._prefix]
                self._read -= self._prefix
                self._prefix = 0
        else:
            tentative = new_text[len(prefix_text):]
            if self.strip_leading_whitespace and self._read_chars == 0:
                tentative = tentative.lstrip()
            self._tentative = tentative

    def _append_read(self, text: str) -> None:
        if self.strip_leading_whitespace and self._read_chars == 0:
            text = text.lstrip()  # the whole output's leading whitespace is dropped
        self._text += text
        self._read_chars += len(text)

    def _emit(self, final: bool) -> DetokenizerStep:
        view = self._text + self._tentative  # the text from `_base` on, as far as it is decoded
        emitted = self.emitted - self._base  # in `view`
        visible, stopped = None, False
        if self.stop:
            start = max(0, emitted - self._max_stop)
            hits = [i for i in (view.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                visible, stopped = min(hits), True  # the stop sequence itself is not sent
        if visible is None:
            if final:
                visible = len(view)
            else:
                visible = len(view.rstrip(REPLACEMENT))  # an incomplete UTF-8 character
                visible -= held_back(view[:visible], self.stop)
        delta = view[emitted:visible] if visible > emitted else ""
        self.emitted += len(delta)
        self.done = stopped or final
        # keep only what the next stop search can reach (and the held-back read text)
        keep_from = min(self.emitted - self._max_stop, self._read_chars)
        if keep_from > self._base:
            self._text = self._text[keep_from - self._base:]
            self._base = keep_from
        return DetokenizerStep(delta, stopped)
