"""ChatIngress: the HTTP face of the application (FastAPI inside a Serve deployment).

Routes:
- `POST /v1/chat/completions`: OpenAI chat completions, text and `image_url` parts, `stream: true`
  as server-sent events (`data: {chunk}` ... `data: [DONE]`);
- `GET /v1/models`, `GET /v1/models/{id}`: the one served model;
- `GET /health`: the ingress is up (no auth); `GET /ready`: a model replica answers (no auth);
- `GET /`: the chat page (serve/static/, no auth): a browser client of `POST /v1/chat/completions`.

Everything a request can get wrong is found here, before the model sees it: the API key, body size,
JSON, fields, model name, messages, images (data URLs only unless allowlisted; bytes, pixels,
count), prompt length and max_tokens. Each refusal is a 4xx with an OpenAI error body. Model
replicas that stop while serving a request give a 503 (or, once a stream has started, an error
event) saying so; clients may retry.

Overload: Ray Serve queues at most `max_queued_requests` (of the BitLlavaModel deployment, per
ingress replica) requests for the model replicas' `max_ongoing_requests` slots and refuses the
next with a `BackPressureError` at once; that becomes a 503 (or 429, the deployment's
`backpressure_config.status_code`) with `Retry-After` and an OpenAI error body. A client that
goes away (a closed stream, a dropped connection) cancels its model request, which frees its
batch slot. `/ready` stays 200 while the model replicas are too busy to answer a ping but have
answered this ingress within `READY_RECENT_S`.

Images are decoded and preprocessed to pixel values here (CPU work off the model replicas); the
model deployment receives token ids and pixel values only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.backbones import context_length
from model.checkpoint import config_from_dict, load_tokenizer
from model.multimodal import BitLlavaConfig
from model.packed.packed_checkpoint import read_packing
from model.towers import load_image_processor
from model.vision import preprocess_images
from serve.engine import GenerationRequest, SamplingParams
from serve.errors import (AUTHENTICATION, INVALID_REQUEST, NOT_FOUND, SERVER_ERROR, UNAVAILABLE, APIError,
                          bad_request, error_event, error_response, overloaded, pydantic_param, retry_after)
from serve.images import load_image
from serve.metrics import IngressMetrics
from serve.model_files import local_model_folder
from serve.openai_schema import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                                 Choice, ChunkChoice, Delta, ModelCard, ModelList, Usage)
from serve.prompt import parse_messages, render_prompt
from serve.settings import ServeSettings

try:  # Ray's replica errors: a replica that died, or that Serve already knows is gone
    from ray.serve.exceptions import ReplicaUnavailableError
except ImportError:  # pragma: no cover - older Ray
    ReplicaUnavailableError = RayActorError

logger = logging.getLogger("ray.serve")

CHAT_ROUTE = "/v1/chat/completions"
STATIC = resources.files("serve") / "static"  # the chat page: index.html, chat.js, chat.css
UPSTREAM_UNAVAILABLE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError,
                        RequestCancelledError)
READY_PING_TIMEOUT_S = 5.0  # /ready: how long a model replica may take to answer a ping
READY_RECENT_S = 30.0  # /ready: a busy model (ping refused or late) that answered this recently is ready


class ModelInfo:
    """What the ingress needs of the model: tokenizer, image processor, template, context length."""

    def __init__(self, folder: str):
        raw, _ = read_packing(folder)
        config = config_from_dict(raw, folder)
        self.multimodal = isinstance(config, BitLlavaConfig)
        text = config.text_config if self.multimodal else config
        self.template = config.template if self.multimodal else "v1"
        self.num_image_tokens = config.num_image_tokens if self.multimodal else 0
        self.context = context_length(text)
        self.processor = load_image_processor(folder, config.vision_config) if self.multimodal else None
        self.tokenizer = load_tokenizer(folder)


def upstream_error(err: BaseException) -> APIError:
    """An exception from the model deployment -> what the client is told."""
    if isinstance(err, BackPressureError):
        return overloaded(err.status_code, err.retry_after_s)
    if isinstance(err, UPSTREAM_UNAVAILABLE):
        return APIError(503, "the model replica serving this request stopped before the request completed "
                             f"({type(err).__name__}); the request was not completed, retry it",
                        UNAVAILABLE, code="model_replica_unavailable", headers=retry_after(None))
    if isinstance(err, ValueError):  # the engine refused the request (the ingress checks should have)
        return bad_request(f"the model refused the request: {err}", "invalid_request")
    return APIError(500, f"internal error while generating: {type(err).__name__}", SERVER_ERROR,
                    code="internal_error")


def cancel(response) -> None:
    """Cancel a model request whose client went away (best effort: it may have just ended or failed).

    `DeploymentResponse.cancel` re-raises the request's own failure (a `BackPressureError`, say), so it is
    for requests that have not failed.
    """
    try:
        response.cancel()
    except Exception as err:  # noqa: BLE001 - the request ended on its own meanwhile
        logger.debug("cancelling a model request: %s", err)


@serve.deployment(name="ChatIngress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class ChatIngress:
    def __init__(self, model: DeploymentHandle, settings: dict):
        self.settings = ServeSettings.from_args(settings)
        self.api_key = self.settings.resolve_api_key()
        self.info = ModelInfo(local_model_folder(self.settings.model, self.settings.cache_dir, weights=False))
        self.model = model
        self.last_model_answer: float | None = None  # time.monotonic() of the model's latest answer to this ingress
        self.metrics = IngressMetrics()
        self.created = int(time.time())
        logger.info("ChatIngress ready: model %r (%s), auth %s, image URL allowlist %s", self.settings.model_name,
                    "multimodal" if self.info.multimodal else "text-only",
                    "on" if self.api_key else "off", self.settings.image_url_allowlist or "empty")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "no API key: send the header 'Authorization: Bearer <key>'", AUTHENTICATION,
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", AUTHENTICATION, code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.limits.max_request_bytes
        declared = request.headers.get("content-length")
        too_large = APIError(413, f"the request body exceeds {limit} bytes", INVALID_REQUEST,
                             code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, body: bytes) -> ChatCompletionRequest:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON: {err}", "invalid_json") from err
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object", "invalid_json")
        try:
            request = ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            first = max(err.errors(), key=lambda e: len(e["loc"]))  # the most specific problem
            param = pydantic_param(first["loc"])
            code = "unknown_parameter" if first["type"] == "extra_forbidden" else "invalid_value"
            message = f"{param}: {first['msg']}" if param else first["msg"]
            raise bad_request(message, code, param) from err
        if request.model != self.settings.model_name:
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", NOT_FOUND, "model", "model_not_found")
        return request

    def prepare(self, request: ChatCompletionRequest, request_id: str) -> GenerationRequest:
        """Messages -> prompt ids and pixel values, enforcing every limit (runs on a worker thread)."""
        limits, info = self.settings.limits, self.info
        chat = parse_messages(request.messages)
        if chat.images and not info.multimodal:
            raise bad_request("this model is text-only; it cannot take images", "images_not_supported",
                              chat.images[0].param)
        if len(chat.images) > limits.max_images:
            raise bad_request(f"{len(chat.images)} images in one request; at most {limits.max_images} are accepted",
                              "too_many_images", "messages")
        images = [load_image(ref.url, limits, self.settings.image_url_allowlist, ref.param) for ref in chat.images]
        ids = render_prompt(chat, info.tokenizer, info.template, info.num_image_tokens)
        if not ids:
            raise bad_request("the prompt is empty", "empty_prompt", "messages")
        n = len(ids)
        if n > limits.max_prompt_tokens:
            raise bad_request(f"the prompt is {n} tokens (images included); at most {limits.max_prompt_tokens} are "
                              "accepted", "prompt_too_long", "messages")
        max_tokens = request.requested_max_tokens()
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = min(limits.default_max_tokens, info.context - n)
        elif max_tokens > limits.max_tokens:
            raise bad_request(f"{param} is {max_tokens}; at most {limits.max_tokens} is accepted",
                              "max_tokens_too_large", param)
        if max_tokens < 1 or n + max_tokens > info.context:
            raise bad_request(f"the prompt ({n} tokens) plus {param} ({max_tokens}) exceeds the model's context "
                              f"of {info.context} tokens", "context_length_exceeded", "messages")
        pixels = preprocess_images(images, info.processor) if images else None
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=list(request.stop),
            ignore_eos=request.ignore_eos,
        )
        return GenerationRequest(ids, sampling, pixels, request_id)

    # ------------------------------------------------------------------ routes

    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        status, streaming = 200, False
        try:
            self.authorize(request)
            body = await self.read_body(request)
            chat = self.parse(body)
            generation = await run_in_threadpool(self.prepare, chat, request_id)
            if chat.stream:
                response = await self.stream(chat, generation, request_id, started)
                streaming = True  # the stream records its own metrics when it ends
                return response
            return await self.complete(chat, generation, request_id)
        except APIError as err:
            status = err.status
            logger.info("request_id=%s %s refused: %d %s: %s", request_id, CHAT_ROUTE, err.status, err.code,
                        err.message)
            return error_response(err)
        except asyncio.CancelledError:
            status = 499  # the client went away (the model replica drops the request)
            raise
        except Exception as err:  # noqa: BLE001 - a bug must still answer with an error body
            status = 500
            logger.exception("request_id=%s %s failed", request_id, CHAT_ROUTE)
            return error_response(APIError(500, f"internal error: {type(err).__name__}", SERVER_ERROR,
                                           code="internal_error"))
        finally:
            if not streaming:
                self.metrics.request(CHAT_ROUTE, status, time.perf_counter() - started)

    async def complete(self, chat: ChatCompletionRequest, generation: GenerationRequest, request_id: str):
        response = self.model.generate.remote(generation)
        try:
            result = await response
        except asyncio.CancelledError:  # the client went away: the model replica frees the batch slot
            cancel(response)
            raise
        except Exception as err:  # noqa: BLE001
            raise upstream_error(err) from err
        self.last_model_answer = time.monotonic()
        if result["error"]:
            raise APIError(500, result["error"], SERVER_ERROR, code="generation_failed")
        usage = Usage(prompt_tokens=result["prompt_tokens"], completion_tokens=result["completion_tokens"],
                      total_tokens=result["prompt_tokens"] + result["completion_tokens"])
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.completion_tokens.inc(usage.completion_tokens)
        body = ChatCompletion(id=f"chatcmpl-{request_id}", created=int(time.time()), model=chat.model,
                              choices=[Choice(message=AssistantMessage(content=result["text"]),
                                              finish_reason=result["finish_reason"])], usage=usage)
        logger.info("request_id=%s %s 200: %d prompt + %d completion tokens (%s)", request_id, CHAT_ROUTE,
                    usage.prompt_tokens, usage.completion_tokens, result["finish_reason"])
        return JSONResponse(body.model_dump())

    async def stream(self, chat: ChatCompletionRequest, generation: GenerationRequest, request_id: str,
                     started: float):
        events = self.model.options(stream=True).generate_stream.remote(generation)
        try:  # the first token before answering: a replica failure or an overload is still a plain 503
            first = await events.__anext__()
        except asyncio.CancelledError:  # the client left while the request was queued or prefilling
            cancel(events)
            raise
        except Exception as err:  # noqa: BLE001 - the request failed: nothing left to cancel
            raise upstream_error(err) from err
        self.last_model_answer = time.monotonic()
        if first.error:
            raise APIError(500, first.error, SERVER_ERROR, code="generation_failed")
        ttft = time.perf_counter() - started
        self.metrics.ttft.observe(ttft)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        created, completion_id = int(time.time()), f"chatcmpl-{request_id}"

        def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices: bool = True) -> str:
            body = ChatCompletionChunk(id=completion_id, created=created, model=chat.model, usage=usage,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])
            data = body.model_dump()
            for choice, model_choice in zip(data["choices"], body.choices):
                choice["delta"] = model_choice.delta.model_dump(exclude_none=True)
            if usage is None:
                data.pop("usage")
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def sse():
            status, event, ended = 200, first, False
            try:
                yield chunk(Delta(role="assistant", content=""))
                while True:
                    if event.error:
                        status, ended = 500, True
                        yield error_event(APIError(500, event.error, SERVER_ERROR, code="generation_failed"))
                        return
                    if event.text:
                        yield chunk(Delta(content=event.text))
                    if event.finish_reason is not None:
                        break
                    try:
                        event = await events.__anext__()
                        self.last_model_answer = time.monotonic()
                    except StopAsyncIteration:
                        raise APIError(500, "the model's stream ended without a finish_reason", SERVER_ERROR,
                                       code="internal_error") from None
                ended = True  # the model's stream is over: nothing to cancel from here on
                yield chunk(Delta(), finish=event.finish_reason)
                usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                              total_tokens=event.prompt_tokens + event.completion_tokens)
                if include_usage:
                    yield chunk(Delta(), usage=usage, choices=False)
                yield "data: [DONE]\n\n"
                self.metrics.prompt_tokens.inc(usage.prompt_tokens)
                self.metrics.completion_tokens.inc(usage.completion_tokens)
                logger.info("request_id=%s %s 200 (stream): %d prompt + %d completion tokens (%s), first token "
                            "after %.3fs", request_id, CHAT_ROUTE, usage.prompt_tokens, usage.completion_tokens,
                            event.finish_reason, ttft)
            except (asyncio.CancelledError, GeneratorExit):
                # the client went away: cancelled while awaiting the model, or closed (GeneratorExit) while
                # suspended at a `yield` (Starlette cancels the response when the connection drops)
                status = 499
                raise
            except Exception as err:  # noqa: BLE001 - headers are sent: report in the stream
                api_error = err if isinstance(err, APIError) else upstream_error(err)
                status = api_error.status
                ended = True  # the model's stream ended (with an error)
                logger.warning("request_id=%s %s stream failed: %s", request_id, CHAT_ROUTE, api_error.message)
                yield error_event(api_error)
            finally:
                if not ended:
                    cancel(events)  # the model replica stops generating and frees the batch slot
                    logger.info("request_id=%s %s stream closed by the client; generation cancelled", request_id,
                                CHAT_ROUTE)
                self.metrics.request(CHAT_ROUTE, status, time.perf_counter() - started)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def list_models(self, request: Request):
        started, status = time.perf_counter(), 200
        try:
            self.authorize(request)
            return ModelList(data=[self.model_card()]).model_dump()
        except APIError as err:
            status = err.status
            raise
        finally:
            self.metrics.request("/v1/models", status, time.perf_counter() - started)

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.settings.model_name, created=self.created)

    async def ready(self):
        """200 when a model replica answers a ping, or is too busy to (its queue full, or every slot taken for
        longer than the ping may wait) but answered this ingress within READY_RECENT_S; else 503."""
        try:
            state = await asyncio.wait_for(self.model.ping.remote(), timeout=READY_PING_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - includes the timeout
            since = None if self.last_model_answer is None else time.monotonic() - self.last_model_answer
            if isinstance(err, (BackPressureError, TimeoutError)) and since is not None and since < READY_RECENT_S:
                return {"status": "ok", "model": self.settings.model_name, "busy": True,
                        "last_answer_s_ago": round(since, 3)}
            return error_response(APIError(503, f"no model replica answered ({type(err).__name__})", UNAVAILABLE,
                                           code="model_unavailable", headers=retry_after(None)))
        self.last_model_answer = time.monotonic()
        return {"status": "ready", "model": self.settings.model_name, **state}


def build_api(ingress: ChatIngress) -> FastAPI:
    """The FastAPI app of one ingress replica (built on the replica, routes bound to it)."""
    api = FastAPI(title="bitllava", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        kind = NOT_FOUND if err.status_code == 404 else INVALID_REQUEST
        message = f"{request.method} {request.url.path}: {err.detail}"
        return error_response(APIError(err.status_code, message, kind, code=code))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        return error_response(bad_request(first["msg"], "invalid_value", pydantic_param(tuple(first["loc"]))))

    @api.post(CHAT_ROUTE)
    async def chat_completions(request: Request):
        return await ingress.chat_completions(request)

    @api.get("/v1/models")
    async def list_models(request: Request):
        return await ingress.list_models(request)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        ingress.authorize(request)
        if model_id != ingress.settings.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", NOT_FOUND, "model", "model_not_found")
        return ingress.model_card().model_dump()

    @api.get("/health")
    async def health():
        return {"status": "ok", "model": ingress.settings.model_name}

    @api.get("/ready")
    async def ready():
        return await ingress.ready()

    @api.get("/")
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    return api
