"""What every HTTP request passes first: a request id (from `X-Request-Id` or new), the body size
limit, one JSON access-log line, and the request metrics. Plain ASGI, so it sees the real status
of every answer, errors included, and can refuse an oversized body before a route reads it."""
from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.metrics import Metrics
from worker.service_errors import BodyTooLarge, task_error_response

log = logging.getLogger("worker.http")

REQUEST_ID_HEADER = "x-request-id"
_CALLER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=+/-]{0,127}$")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Stamps the current request's id on log records made while answering it (same task or thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        return True


def install_request_id_filter() -> None:
    """Add the filter to the root handlers (after logging is configured), once."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_request_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        caller_id = headers.get(REQUEST_ID_HEADER, "")
        request_id = caller_id if _CALLER_ID.match(caller_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.monotonic()
        state: dict[str, Any] = {"status": 500, "sent": False, "too_large": None}

        async def send_with_id(message: Message) -> None:
            if state["too_large"] is not None:
                return  # the route's own answer to a body cut short is replaced by the 413 below
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["sent"] = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            declared = _content_length(headers)
            if declared is not None and declared > self.max_request_bytes:
                state["too_large"] = BodyTooLarge(limit=self.max_request_bytes, size=declared)
            else:
                await self.app(scope, self._counting(receive, state), send_with_id)
        except Exception:
            if state["too_large"] is None:
                self._record(scope, request_id=request_id, status=500, seconds=time.monotonic() - started)
                raise
        finally:
            request_id_var.reset(token)
        if state["too_large"] is not None and not state["sent"]:
            state["status"] = 413
            response = task_error_response(state["too_large"])
            response.headers["x-request-id"] = request_id
            await response(scope, receive, send)
        self._record(scope, request_id=request_id, status=state["status"], seconds=time.monotonic() - started)

    def _counting(self, receive: Receive, state: dict[str, Any]) -> Receive:
        """Counts body bytes as the route reads them, for bodies sent without a Content-Length."""
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_request_bytes:
                    state["too_large"] = BodyTooLarge(limit=self.max_request_bytes)
                    raise state["too_large"]
            return message

        return counted

    def _record(self, scope: Scope, *, request_id: str, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.on_request(method=scope["method"], route=route, status=status, seconds=seconds)
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(level, "%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1000,
                extra={"request_id": request_id})


def _content_length(headers: dict[str, str]) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None
