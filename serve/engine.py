"""Continuous batching for one model replica: concurrent requests share every forward pass.

Source: the iteration-level scheduling of Orca (Yu et al., OSDI 2022), as vLLM and TGI serve LLMs,
kept minimal on top of transformers' `DynamicCache`. One `step()`:

1. admits waiting requests (FIFO, up to `max_batch_size` rows in all and `max_prefill_tokens`
   padded tokens per prefill) and prefills them together: prompts left-padded to one length,
   every image of the newcomers through the vision tower in one call, one forward pass;
2. merges the newcomers' KV cache into the running batch's (both left-padded to one length);
3. decodes one token for every running request in one forward pass (positions per row, so a
   row's logits do not depend on its neighbours' padding);
4. retires finished and cancelled rows (`batch_select_indices`) and drops cache columns that
   are padding in every remaining row.

Requests differ in `max_tokens`, `temperature`, `top_p`, `seed` and `stop`: sampling is per row
(a torch.Generator per request, so a seeded request samples the same tokens whatever it is
batched with). Text is detokenized incrementally, one `IncrementalDetokenizer` per request
(serve/detokenizer.py, vLLM's method: a small window of recent tokens is decoded per token, and stop
sequences are searched in the new text only); text that could be the start of a stop sequence, or
an incomplete UTF-8 character, is held back until it is known.

The engine is synchronous and single-threaded: `submit` and `cancel` may be called from another
thread (the replica's event loop), everything else runs on the thread that calls `step`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from model.backbones import context_length
from serve.detokenizer import IncrementalDetokenizer, skipped_token_ids
from serve.detokenizer import held_back as _held_back  # noqa: F401 - kept importable from here

FINISH_STOP, FINISH_LENGTH, FINISH_ERROR = "stop", "length", "error"


@dataclass
class SamplingParams:
    """max_tokens: generated tokens at most; temperature 0 is greedy; top_p nucleus mass; seed fixes sampling;
    ignore_eos: generate max_tokens tokens even past the end-of-sequence token (benchmarks)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    prompt_ids: list[int]  # image placeholders already expanded to num_image_tokens positions each
    sampling: SamplingParams
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S), one per image, in order of appearance
    request_id: str = ""


@dataclass
class GenerationEvent:
    """One accepted token of one request: the text it added (may be empty while held back)."""

    text: str
    finish_reason: str | None  # None while running; "stop", "length" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Sequence:
    """A request's state inside the engine."""

    def __init__(self, request: GenerationRequest, detokenizer: IncrementalDetokenizer | None = None):
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.generated: list[int] = []  # every sampled token (eos included)
        self.detokenizer = detokenizer  # the text of the tokens (eos excluded); set by BatchEngine.submit
        self.length = self.prompt_tokens  # tokens of this row in the KV cache
        self.pending: int | None = None  # sampled, not yet fed through the model
        self.finish_reason: str | None = None
        self.cancelled = False
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.sink = None  # owner's delivery channel (the deployment's asyncio.Queue)


class BatchEngine:
    """Runs `GenerationRequest`s of one model with continuous batching (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_prefill_tokens: int = 16384,
                 max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        text_config = getattr(model.config, "text_config", model.config)
        self.max_context = max_context or context_length(text_config)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._skipped_ids = skipped_token_ids(tokenizer)  # what decode(skip_special_tokens=True) drops
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 for real tokens, 0 for left padding
        self.tokens_generated = 0
        self.steps = 0
        self.last_decode_rows = 0  # rows of the latest decode step (0: none ran)

    # ------------------------------------------------------------------ queue (any thread)

    def submit(self, request: GenerationRequest) -> Sequence:
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + request.sampling.max_tokens > self.max_context:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({request.sampling.max_tokens}) exceeds the model's "
                             f"context of {self.max_context} tokens")
        if request.sampling.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        seq = Sequence(request, IncrementalDetokenizer(self.tokenizer, request.sampling.stop,
                                                       skipped_ids=self._skipped_ids))
        with self._lock:
            self._waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self._active)

    # ------------------------------------------------------------------ stepping (engine thread)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, GenerationEvent]]:
        """Prefill newcomers, decode one token for every running request; (sequence, event) pairs."""
        events: list[tuple[Sequence, GenerationEvent]] = []
        self.last_decode_rows = 0
        self._retire()
        newcomers = self._admit()
        if newcomers:
            events += self._prefill(newcomers)
            self._retire()
        if self._active:
            events += self._decode()
            self._retire()
        self.steps += 1
        return events

    def fail_all(self, message: str) -> list[tuple[Sequence, GenerationEvent]]:
        """Finish every running and waiting request with an error (after an unexpected failure)."""
        with self._lock:
            seqs = self._active + list(self._waiting)
            self._waiting.clear()
        self._reset()
        return [(s, self._error_event(s, message)) for s in seqs]

    # ------------------------------------------------------------------ internals

    def _admit(self) -> list[Sequence]:
        taken: list[Sequence] = []
        longest = 0
        with self._lock:
            while self._waiting and len(self._active) + len(taken) < self.max_batch_size:
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    continue
                longest_if = max(longest, seq.prompt_tokens)
                if taken and longest_if * (len(taken) + 1) > self.max_prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
                longest = longest_if
        return taken

    def _prefill(self, seqs: list[Sequence]) -> list[tuple[Sequence, GenerationEvent]]:
        events: list[tuple[Sequence, GenerationEvent]] = []
        try:
            groups = [(seqs, *self._prefill_forward(seqs))]
        except Exception as err:  # noqa: BLE001 - find the request that fails, serve the others
            if len(seqs) == 1:
                return [(seqs[0], self._error_event(seqs[0], _failure("prefill", err)))]
            groups = []
            for seq in seqs:
                try:
                    groups.append(([seq], *self._prefill_forward([seq])))
                except Exception as one:  # noqa: BLE001
                    events.append((seq, self._error_event(seq, _failure("prefill", one))))
        for group, cache, mask, logits in groups:
            self._merge(group, cache, mask)
            tokens = self._sample(logits, group)
            events += [(seq, self._accept(seq, token)) for seq, token in zip(group, tokens)]
        return events

    def _prefill_forward(self, seqs: list[Sequence]):
        device = self.model.device
        longest = max(s.prompt_tokens for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)  # (n, L)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)  # (n, L)
        for row, seq in enumerate(seqs):
            ids[row, longest - seq.prompt_tokens:] = torch.tensor(seq.request.prompt_ids)
            mask[row, longest - seq.prompt_tokens:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, L) per-row positions, padding at 0
        kwargs = {}
        pixels = [s.request.pixel_values for s in seqs if s.request.pixel_values is not None]
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels).to(device)  # (N images, 3, S, S); the tower casts to its dtype
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         use_cache=True, logits_to_keep=1, **kwargs)
        return out.cache, mask.to(device), out.logits[:, -1]  # logits (n, V)

    def _decode(self) -> list[tuple[Sequence, GenerationEvent]]:
        device = self.model.device
        rows = self._active
        self.last_decode_rows = len(rows)
        tokens = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=device)  # (B, 1)
        positions = torch.tensor([[s.length] for s in rows], dtype=torch.long, device=device)  # (B, 1)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
        try:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                             cache=self._cache, use_cache=True)
        except Exception as err:  # noqa: BLE001 - the batch's cache is unusable now: fail its requests
            message = _failure("decode", err)
            events = [(s, self._error_event(s, message)) for s in rows]
            self._reset()
            return events
        self._cache, self._mask = out.cache, mask
        for seq in rows:
            seq.length += 1
        sampled = self._sample(out.logits[:, -1], rows)
        return [(seq, self._accept(seq, token)) for seq, token in zip(rows, sampled)]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits (B, V) -> one token per row with that row's temperature / top_p / generator."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for row, seq in enumerate(seqs):
            params = seq.request.sampling
            if params.temperature <= 1e-5:
                out.append(greedy[row])
                continue
            probs = torch.softmax(logits[row].cpu() / params.temperature, dim=-1)  # (V,)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
        return out

    def _accept(self, seq: Sequence, token: int) -> GenerationEvent:
        """Record a sampled token; decide whether the request is finished; the text it makes visible."""
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        seq.generated.append(token)
        self.tokens_generated += 1
        finish = None
        if token == self.eos_id and not seq.request.sampling.ignore_eos:
            finish = FINISH_STOP
            delta, stopped = seq.detokenizer.finish()
        else:
            if len(seq.generated) >= seq.request.sampling.max_tokens or seq.length >= self.max_context:
                finish = FINISH_LENGTH
            delta, stopped = seq.detokenizer.add(token, final=finish is not None)
        if stopped:
            finish = FINISH_STOP
        if finish is not None:
            seq.finish_reason = finish
        else:
            seq.pending = token
        return GenerationEvent(delta, finish, seq.prompt_tokens, len(seq.generated))

    def _error_event(self, seq: Sequence, message: str) -> GenerationEvent:
        seq.finish_reason = FINISH_ERROR
        return GenerationEvent("", FINISH_ERROR, seq.prompt_tokens, len(seq.generated), error=message)

    def _merge(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding both caches to one length."""
        if not self._active:
            self._active, self._cache, self._mask = list(seqs), cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            keys = torch.cat([_left_pad(old.keys, length, 2), _left_pad(new.keys, length, 2)])  # (B, H, L, hd)
            values = torch.cat([_left_pad(old.values, length, 2), _left_pad(new.values, length, 2)])
            layers.append((keys, values))
        self._cache = DynamicCache(layers)
        self._mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(mask, length, 1)])
        self._active = self._active + list(seqs)

    def _retire(self) -> None:
        """Drop finished and cancelled rows; then cache columns that are padding for every row left."""
        keep = [i for i, s in enumerate(self._active) if s.finish_reason is None and not s.cancelled]
        if len(keep) == len(self._active):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._active = [self._active[i] for i in keep]
        start = int(self._mask.any(dim=0).float().argmax())  # first column some row uses
        if start > 0:
            self._cache = DynamicCache([(layer.keys[:, :, start:], layer.values[:, :, start:])
                                        for layer in self._cache.layers])
            self._mask = self._mask[:, start:]

    def _reset(self) -> None:
        self._active, self._cache, self._mask = [], None, None


def _failure(stage: str, err: Exception) -> str:
    return f"the model failed during {stage}: {type(err).__name__}: {err}"


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)

