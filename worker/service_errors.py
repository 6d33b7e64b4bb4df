"""How the HTTP service answers errors: one function maps a TaskError to a status, and every error
body has one shape, OpenAI's `{"error": {...}}` plus our `code` and `retryable`, so the official
client and agents read the same thing."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from schemas.errors import ErrorCode, TaskError
from worker.auth import AuthError

log = logging.getLogger(__name__)


class Overloaded(TaskError):
    """More requests in flight than --max-queued-requests: come back shortly (429)."""

    def __init__(self, *, limit: int, retry_after_s: int) -> None:
        super().__init__(ErrorCode.MODEL_UNAVAILABLE, (
            f"too many requests in flight: the limit is max_queued_requests={limit}; retry after {retry_after_s}s"),
            retryable=True)
        self.retry_after_s = retry_after_s


class NotSupported(TaskError):
    """A well-formed request for something this deployment cannot do (501)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_PARAMETER, message, retryable=False)


class BodyTooLarge(TaskError):
    def __init__(self, *, limit: int, size: int | None = None) -> None:
        got = f"{size} bytes" if size is not None else "more bytes than that"
        super().__init__(ErrorCode.MESSAGE_TOO_LARGE, (
            f"request body is {got}; the limit is max_request_bytes={limit}"), retryable=False)


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400, ErrorCode.INVALID_ENCODING: 400, ErrorCode.NOT_AN_OBJECT: 400,
    ErrorCode.UNKNOWN_KIND: 400, ErrorCode.UNSUPPORTED_SCHEMA_VERSION: 400, ErrorCode.MISSING_FIELD: 400,
    ErrorCode.INVALID_FIELD: 400, ErrorCode.UNSAFE_IDENTIFIER: 400,
    ErrorCode.EMPTY_INPUT: 422, ErrorCode.INVALID_PARAMETER: 422, ErrorCode.MAX_TOKENS_OUT_OF_RANGE: 422,
    ErrorCode.INVALID_RESPONSE_SCHEMA: 422, ErrorCode.OUTPUT_TRUNCATED: 422,
    ErrorCode.INPUT_TOO_LONG: 413, ErrorCode.TOO_MANY_INPUTS: 413, ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.UNKNOWN_BATCH: 404, ErrorCode.DUPLICATE_ID: 409, ErrorCode.BATCH_CONFLICT: 409,
    ErrorCode.UNSUPPORTED_KIND: 501,
    ErrorCode.MODEL_UNAVAILABLE: 503, ErrorCode.OUT_OF_MEMORY: 503, ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.RESULTS_PENDING: 503, ErrorCode.PUBLISH_FAILED: 503,
    ErrorCode.INTERNAL: 500, ErrorCode.TOO_MANY_DELIVERIES: 500,
}


def http_status(exc: TaskError) -> int:
    """The one place a TaskError becomes an HTTP status."""
    if isinstance(exc, Overloaded):
        return 429
    if isinstance(exc, NotSupported):
        return 501
    # A code added later without a status here: retryable ones are transient, others the request's.
    return _STATUS.get(exc.code, 503 if exc.retryable else 422)


def error_response(status: int, *, code: str, message: str, retryable: bool = False,
                   retry_after_s: int | None = None) -> JSONResponse:
    kind = ("rate_limit_error" if status == 429 else "authentication_error" if status in (401, 403)
            else "server_error" if status >= 500 and status != 501 else "invalid_request_error")
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"error": {"message": message, "type": kind, "code": code, "param": None, "retryable": retryable}}
    return JSONResponse(body, status_code=status, headers=headers)


def task_error_response(exc: TaskError, *, retry_after_s: int = 1) -> JSONResponse:
    status = http_status(exc)
    wait = getattr(exc, "retry_after_s", retry_after_s) if status in (429, 503) and exc.retryable else None
    return error_response(status, code=exc.code.value, message=exc.message, retryable=exc.retryable,
                          retry_after_s=wait)


def validation_error(exc: RequestValidationError) -> TaskError:
    """FastAPI's first complaint about a request body as one of our error codes, naming the field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = ".".join(loc) or "body"
    leaf = loc[-1] if loc else ""
    kind = err.get("type", "")
    if kind == "json_invalid":
        return TaskError(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {err.get('msg')}")
    if kind == "missing":
        return TaskError(ErrorCode.MISSING_FIELD, f"required field {field!r} is missing")
    if kind == "extra_forbidden":
        return TaskError(ErrorCode.INVALID_FIELD, f"{field} is not a field of this request; remove it")
    if kind in ("too_short", "string_too_short"):
        return TaskError(ErrorCode.EMPTY_INPUT, f"{field} must not be empty")
    if loc == ["body"]:
        return TaskError(ErrorCode.NOT_AN_OBJECT, f"request body must be a JSON object: {err.get('msg')}")
    if leaf == "max_tokens":
        return TaskError(ErrorCode.MAX_TOKENS_OUT_OF_RANGE, f"{field}: {err.get('msg')}")
    if leaf in ("temperature", "top_p", "dims", "dimensions", "seed", "stop", "n"):
        return TaskError(ErrorCode.INVALID_PARAMETER, f"{field}: {err.get('msg')}")
    return TaskError(ErrorCode.INVALID_FIELD, f"{field}: {err.get('msg')}")


def install_error_handlers(app: FastAPI, *, retry_after_s: int, on_error: Callable[[str], None]) -> None:
    """Every error answer goes through here; `on_error` counts it by code (for /metrics)."""
    async def on_task_error(request: Request, exc: TaskError) -> JSONResponse:
        on_error(exc.code.value)
        return task_error_response(exc, retry_after_s=retry_after_s)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        on_error(error.code.value)
        return task_error_response(error)

    async def on_auth(request: Request, exc: AuthError) -> JSONResponse:
        code = {401: "unauthenticated", 403: "permission_denied"}.get(exc.status, "auth_unavailable")
        on_error(code)
        log.warning("push request refused: %s", exc.message)
        return error_response(exc.status, code=code, message=exc.message, retryable=exc.status >= 500,
                              retry_after_s=retry_after_s if exc.status >= 500 else None)

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code=code, message=str(exc.detail))

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        on_error(ErrorCode.INTERNAL.value)
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, code=ErrorCode.INTERNAL.value, retryable=True,
                              message=f"internal error ({type(exc).__name__}); retry, and report it if it persists")

    handlers: dict[Any, Any] = {TaskError: on_task_error, RequestValidationError: on_validation,
                                AuthError: on_auth, HTTPException: on_http, Exception: on_crash}
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
