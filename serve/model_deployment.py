"""BitLlavaModel: the Serve deployment that holds one packed model and batches every request to it.

One replica = one model + one `BatchEngine` driven by a loop on the replica's event loop: the
engine's `step()` (the forward passes) runs on a dedicated thread, so the replica keeps accepting
requests and streaming tokens while the model computes. The model is loaded and warmed up in
`__init__` (kernels compiled or loaded, a batched multimodal generation run once on the engine's
thread), so a replica reports ready only when its first request will be fast. It computes with as
many threads as the CPUs it reserves (`ray_actor_options.num_cpus`, rounded up) unless
`engine.torch_threads` says otherwise.

Methods called by the ingress through a DeploymentHandle:
- `generate_stream(request)`: async generator of `GenerationEvent`s (one per generated token);
- `generate(request)`: the whole completion as a dict;
- `ping()`: liveness and queue state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from ray import serve

from model.chat import user_turn
from model.conversation import prompt_ids
from model.packed.packed_checkpoint import load_packed
from model.precision import resolve_dtypes, set_vision_dtype
from model.vision import preprocess_images
from serve.engine import BatchEngine, GenerationEvent, GenerationRequest, SamplingParams
from serve.metrics import ModelMetrics
from serve.model_files import local_model_folder
from serve.settings import EngineSettings, from_mapping

logger = logging.getLogger("ray.serve")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device is cuda but this replica sees no GPU (set ray_actor_options.num_gpus)")
    return torch.device(name)


def replica_threads(torch_threads: int | None) -> int:
    """engine.torch_threads, else the CPUs Ray reserved for this replica rounded up (0.5 CPU: 1 thread)."""
    if torch_threads:
        return torch_threads
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return torch.get_num_threads()  # the class used outside a Ray actor (scripts, tests): as torch has it
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(cpus - 1e-9))


@serve.deployment(
    name="BitLlavaModel",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=8,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
class BitLlavaModel:
    def __init__(self, model: str, engine: dict | None = None, cache_dir: str | None = None):
        started = time.perf_counter()
        settings = from_mapping(EngineSettings, engine, "args.engine")
        threads = replica_threads(settings.torch_threads)
        torch.set_num_threads(threads)
        # the engine steps on this one thread: torch's and the kernels' OpenMP thread counts are per
        # calling thread, so they are set there too, and the warm-up runs there (its thread pool warm)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitllava-engine",
                                            initializer=torch.set_num_threads, initargs=(threads,))
        folder = local_model_folder(model, cache_dir)
        device = _device(settings.device)
        llm_dtype, vision_dtype = resolve_dtypes(settings.dtype, device)
        loaded = load_packed(folder, dtype=llm_dtype, backend=settings.backend, head=settings.head)
        set_vision_dtype(loaded.model, vision_dtype)
        loaded.model.to(device)
        self.loaded = loaded
        self.engine = BatchEngine(loaded.model, loaded.tokenizer, settings.max_batch_size,
                                  settings.max_prefill_tokens)
        self.batch_wait_s = settings.batch_wait_ms / 1000
        loaded_s = time.perf_counter() - started
        self._executor.submit(self._warm_up).result()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.metrics = ModelMetrics()
        self._window_tokens, self._window_start = 0, time.monotonic()
        towers = f", tower {str(vision_dtype).removeprefix('torch.')}" if loaded.multimodal else ""
        logger.info("BitLlavaModel ready: %s (%s, %s%s, %d threads) loaded in %.1fs, warmed up in %.1fs", model,
                    loaded.layout, str(llm_dtype).removeprefix("torch."), towers, threads, loaded_s,
                    time.perf_counter() - started - loaded_s)

    # ------------------------------------------------------------------ warm-up

    def _warm_up(self) -> None:
        """Two requests batched together (one with an image on a multimodal model), two tokens each."""
        loaded, config = self.loaded, self.loaded.model.config
        template = getattr(config, "template", "v1")  # the ingress renders text-only models' prompts with v1 too
        requests = []
        for text, images in (("Describe the image.", 1 if loaded.multimodal else 0), ("Hello", 0)):
            ids = prompt_ids([user_turn(text, images)], loaded.tokenizer, template, images,
                             getattr(config, "num_image_tokens", 0))
            pixels = preprocess_images([Image.new("RGB", (48, 32), "gray")], loaded.image_processor) if images else None
            requests.append(GenerationRequest(ids, SamplingParams(max_tokens=2, temperature=0), pixels))
        seqs = [self.engine.submit(r) for r in requests]
        while self.engine.has_work():
            for _, event in self.engine.step():
                if event.error:
                    raise RuntimeError(f"warm-up generation failed: {event.error}")
        assert all(s.finish_reason is not None for s in seqs)

    # ------------------------------------------------------------------ the engine loop

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work():
                self._record_idle()
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.batch_wait_s:
                    await asyncio.sleep(self.batch_wait_s)  # let concurrent arrivals share the prefill
            try:
                events = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as err:  # noqa: BLE001 - keep serving: fail what was running, go on
                logger.exception("engine step failed; failing the running requests")
                events = self.engine.fail_all(f"the model failed: {type(err).__name__}: {err}")
            for seq, event in events:
                seq.sink.put_nowait(event)
            self._record_step(events)

    def _record_step(self, events: list) -> None:
        tokens = sum(1 for _, e in events if e.error is None)
        self._window_tokens += tokens
        if tokens:
            self.metrics.tokens.inc(tokens)
        self.metrics.queue_length.set(self.engine.num_waiting)
        self.metrics.running.set(self.engine.num_active)
        if self.engine.last_decode_rows:
            self.metrics.batch_size.observe(self.engine.last_decode_rows)
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self.metrics.tokens_per_second.set(self._window_tokens / (now - self._window_start))
            self._window_tokens, self._window_start = 0, now

    def _record_idle(self) -> None:
        self.metrics.queue_length.set(0)
        self.metrics.running.set(0)
        now = time.monotonic()
        self.metrics.tokens_per_second.set(self._window_tokens / max(now - self._window_start, 1e-9))
        self._window_tokens, self._window_start = 0, now

    def _submit(self, request: GenerationRequest):
        self._ensure_loop()
        seq = self.engine.submit(request)  # ValueError for a request the model cannot take
        seq.sink = asyncio.Queue()
        self._wakeup.set()
        return seq

    # ------------------------------------------------------------------ handle methods

    async def generate_stream(self, request: GenerationRequest):
        """Yield one `GenerationEvent` per generated token; the last has a finish_reason."""
        seq = self._submit(request)
        try:
            while True:
                event: GenerationEvent = await seq.sink.get()
                yield event
                if event.finish_reason is not None:
                    break
        finally:
            if seq.finish_reason is None:
                self.engine.cancel(seq)  # the caller went away: free the batch slot
            self._log(request, seq)

    async def generate(self, request: GenerationRequest) -> dict:
        """The whole completion: text, finish_reason, token counts (and error, if the model failed)."""
        seq = self._submit(request)
        parts = []
        try:
            while True:
                event: GenerationEvent = await seq.sink.get()
                parts.append(event.text)
                if event.finish_reason is not None:
                    break
        finally:
            if seq.finish_reason is None:
                self.engine.cancel(seq)
            self._log(request, seq)
        return {"text": "".join(parts), "finish_reason": event.finish_reason, "error": event.error,
                "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "queued_s": None if seq.first_token_at is None else seq.first_token_at - seq.submitted_at}

    async def ping(self) -> dict:
        """Liveness and queue state, and the threads the engine thread computes with."""
        threads = await asyncio.get_running_loop().run_in_executor(self._executor, torch.get_num_threads)
        return {"status": "ok", "waiting": self.engine.num_waiting, "running": self.engine.num_active,
                "pid": os.getpid(), "engine_threads": threads}

    def check_health(self) -> None:
        """Serve calls this periodically; a dead engine loop makes Serve replace the replica."""
        if self._loop_task is not None and self._loop_task.done():
            error = None if self._loop_task.cancelled() else self._loop_task.exception()
            raise RuntimeError(f"the engine loop stopped: {error!r}")

    def _log(self, request: GenerationRequest, seq) -> None:
        ttft = None if seq.first_token_at is None else seq.first_token_at - seq.submitted_at
        logger.info("request_id=%s generation %s: %d prompt + %d completion tokens, first token after %s, %.3fs",
                    request.request_id, seq.finish_reason or "cancelled", seq.prompt_tokens, len(seq.generated),
                    "-" if ttft is None else f"{ttft:.3f}s", time.monotonic() - seq.submitted_at)
