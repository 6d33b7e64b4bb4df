"""For agents: `GemmaClient`, an async HTTP client for the service (timeouts, retries with backoff on
429, 5xx and connection errors honouring Retry-After, and a fallback when the service stays down),
and `publish_task` for agents that hand work over through Pub/Sub instead of waiting for it."""
from __future__ import annotations

import asyncio
import email.utils
import functools
import inspect
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx
from pydantic import BaseModel

from schemas.codec import validate_envelope
from schemas.errors import ErrorCode, TaskError

log = logging.getLogger(__name__)

Fallback = Callable[[str, dict[str, Any]], Any | Awaitable[Any]]
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class GemmaClientError(Exception):
    """The service answered no, or could not be reached: status (None if never reached), code, message."""

    def __init__(self, *, status: int | None, code: str, message: str, retryable: bool) -> None:
        super().__init__(f"[{code}] {message}" + (f" (HTTP {status})" if status else ""))
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable


class GemmaClient:
    """`async with GemmaClient(url) as gemma: await gemma.generate("...")`.

    A 4xx (other than 429) is the caller's mistake and raises at once. 429, 5xx (other than 501) and
    connection errors are retried `retries` times with exponential backoff and jitter, waiting at least
    what Retry-After asks (up to `max_backoff_s`); then `fallback(path, body)` answers if given, else
    GemmaClientError is raised."""

    def __init__(self, base_url: str, *, timeout_s: float = 120.0, connect_timeout_s: float = 5.0,
                 retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 fallback: Fallback | None = None, token: Callable[[], str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.fallback = fallback
        self._token = token  # e.g. an ID token provider for a private Cloud Run service
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), transport=transport,
                                       timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))

    async def __aenter__(self) -> GemmaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- routes ------------------------------------------------------------------------------
    async def generate(self, prompt: str, **params: Any) -> dict[str, Any]:
        """POST /generate: `text`, `finish_reason`, token counts. params: max_tokens, temperature, top_p,
        stop, seed, truncate, response_schema."""
        return await self.call("/generate", {"prompt": prompt, **params})

    async def embed(self, texts: Sequence[str], **params: Any) -> dict[str, Any]:
        """POST /embed: `embeddings` (one per text, in order), `dims`, `input_tokens`. params: dims, truncate."""
        return await self.call("/embed", {"texts": list(texts), **params})

    async def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> dict[str, Any]:
        """POST /v1/chat/completions, OpenAI's shape."""
        return await self.call("/v1/chat/completions", {"messages": list(messages), **params})

    async def health(self) -> dict[str, Any]:
        response = await self._http.get("/healthz")
        response.raise_for_status()
        return response.json()

    # ---- the retry loop ----------------------------------------------------------------------
    async def call(self, path: str, body: dict[str, Any]) -> Any:
        """POST body to path with retries; then the fallback, or GemmaClientError."""
        headers = {"X-Request-Id": uuid.uuid4().hex}  # the same on every retry, to follow it in the logs
        last: GemmaClientError | None = None
        for attempt in range(self.retries + 1):
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token()}"
            try:
                response = await self._http.post(path, json=body, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, timed out
                last = GemmaClientError(status=None, code="unreachable", retryable=True,
                                        message=f"{type(exc).__name__}: {exc or 'no detail'}")
                wait = self._backoff(attempt)
            else:
                if response.status_code < 400:
                    return response.json()
                last = _error_from(response)
                if response.status_code not in _RETRY_STATUSES:
                    raise last
                wait = max(self._backoff(attempt), _retry_after(response) or 0.0)
            if attempt < self.retries:
                log.info("gemma %s failed (%s); retry %d/%d in %.2fs", path, last, attempt + 1, self.retries, wait)
                await asyncio.sleep(min(wait, self.max_backoff_s))
        if self.fallback is None:
            raise last  # type: ignore[misc]
        log.warning("gemma %s still failing after %d retries (%s); using the fallback", path, self.retries, last)
        answer = self.fallback(path, body)
        return await answer if inspect.isawaitable(answer) else answer

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)


def _error_from(response: httpx.Response) -> GemmaClientError:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    status = response.status_code
    return GemmaClientError(status=status, code=str(error.get("code") or f"http_{status}"),
                            message=str(error.get("message") or response.text[:500]),
                            retryable=status in _RETRY_STATUSES)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def publish_task(topic: str, envelope: Mapping[str, Any] | BaseModel, *, project: str | None = None,
                 publisher: Any = None, timeout_s: float = 60.0) -> str:
    """Validate an envelope (a task id is made up if it has none), publish it, and return its task id.

    Blocking; from async code use `await asyncio.to_thread(publish_task, ...)`. The result appears at
    `{results}/{batch_id or "adhoc"}/{task_id}.json` once a worker has run it."""
    raw = envelope.model_dump(mode="json") if isinstance(envelope, BaseModel) else dict(envelope)
    raw.setdefault("task_id", f"t-{uuid.uuid4().hex}")
    task = validate_envelope(raw)  # DecodeError (a TaskError) names what is wrong
    path = topic if topic.startswith("projects/") else _topic_path(topic, project)
    attributes = {"task_id": task.task_id, "kind": task.kind, **({"batch_id": task.batch_id} if task.batch_id else {})}
    client = publisher or default_publisher(os.environ.get("PUBSUB_EMULATOR_HOST"))
    try:
        client.publish(path, task.model_dump_json().encode(), **attributes).result(timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - any publish failure is one retryable error for the agent
        raise TaskError(ErrorCode.PUBLISH_FAILED, f"could not publish task {task.task_id} to {path}: {exc}",
                        retryable=True) from exc
    return task.task_id


@functools.lru_cache(maxsize=4)
def default_publisher(emulator_host: str | None) -> Any:
    """One publisher per process (per emulator address, which the client reads when it is made):
    gRPC channels are pooled and reused, never opened per task."""
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient()


def _topic_path(topic: str, project: str | None) -> str:
    project = project or os.environ.get("PUBSUB_PROJECT_ID") or os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not project:
        raise TaskError(ErrorCode.INVALID_PARAMETER, f"topic {topic!r} is a short name and no project is known; "
                                                     "pass project= or projects/P/topics/T, or set PUBSUB_PROJECT_ID")
    return f"projects/{project}/topics/{topic}"
