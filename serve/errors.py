"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every refusal of the ingress is an `APIError`; `error_response` turns one into the JSON response
and `error_event` into the server-sent event a stream ends with. `overloaded` is the answer to a
request Ray Serve refused for backpressure (the model deployment's `max_queued_requests`).
"""

from __future__ import annotations

import json
import math

from fastapi.responses import JSONResponse

from serve.openai_schema import ErrorBody, ErrorDetail

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"
RATE_LIMITED = "rate_limit_error"
RETRY_AFTER_S = 1  # the Retry-After of a 503 whose cause sets none (a deployment without backpressure_config)


class APIError(Exception):
    """A request the server refuses (4xx) or could not complete (5xx)."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                           code=self.code)).model_dump()

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.code!r}, {self.message!r})"


def bad_request(message: str, code: str, param: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def retry_after(seconds: float | None) -> dict[str, str]:
    """The `Retry-After` header: whole seconds (RFC 9110 delay-seconds), rounded up, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(RETRY_AFTER_S if seconds is None else seconds)))}


def overloaded(status: int = 503, retry_after_s: float | None = None) -> APIError:
    """A request refused because every replica is busy and the queue in front of them is full.

    `status` and `retry_after_s` are the refusing deployment's `backpressure_config` (503 or 429), as
    Ray Serve's `BackPressureError` carries them.
    """
    return APIError(status, "the server is overloaded: every model replica is busy and the queue is full; "
                            "retry after the time in the Retry-After header",
                    RATE_LIMITED if status == 429 else UNAVAILABLE, code="overloaded",
                    headers=retry_after(retry_after_s))


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def error_event(err: APIError) -> str:
    """The SSE event of an error that happens after a stream has started (OpenAI clients raise on it)."""
    return f"data: {json.dumps(err.body())}\n\n"


_TYPE_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}


def pydantic_param(loc: tuple) -> str | None:
    """A pydantic error location as an OpenAI `param`: ("messages", 0, "content") -> "messages[0].content".

    The labels pydantic inserts for union branches ("str", "list[...]", "function-after[...]") and the
    tags of tagged unions are dropped.
    """
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_LABELS or "[" in part or "(" in part or loc[i + 1:i + 2] == (part,):
            continue  # a union branch label, or a tagged union's tag before its field of the same name
        else:
            out += ("." if out else "") + part
    return out or None
