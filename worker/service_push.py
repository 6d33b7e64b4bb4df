"""`POST /pubsub/push`: Pub/Sub push deliveries through the same runner as the pull worker. The
answer is 2xx only once the runner has settled the task (result written, or found already written),
so Pub/Sub redelivers anything that did not land: the outcome's `ack` becomes 200, a retry 503."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from schemas.envelope import SAFE_ID_PATTERN
from schemas.errors import ErrorCode, TaskError
from worker.runner import Delivery, Outcome
from worker.service_errors import NotSupported

log = logging.getLogger(__name__)
router = APIRouter(tags=["pubsub"])
_SAFE_ID = re.compile(SAFE_ID_PATTERN)

# Written out rather than derived from a model: the route parses the body itself, after the token check.
PUSH_ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["message"],
    "properties": {
        "message": {
            "type": "object",
            "properties": {
                "data": {"type": "string", "format": "byte", "description": "The task envelope, base64-encoded."},
                "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
                "messageId": {"type": "string"},
                "publishTime": {"type": "string"},
            },
        },
        "subscription": {"type": "string"},
        "deliveryAttempt": {"type": "integer", "minimum": 1},
    },
}


class MalformedPush(TaskError):
    """Not a Pub/Sub push envelope (400). Keeps what could be read, for the error result."""

    def __init__(self, code: ErrorCode, message: str, *, attributes: dict[str, str] | None = None,
                 message_id: str | None = None) -> None:
        super().__init__(code, message, retryable=False)
        self.attributes = attributes or {}
        self.message_id = message_id


def parse_push_envelope(body: bytes) -> Delivery:
    """The standard push body `{"message": {"data", "attributes", "messageId"}, "subscription",
    "deliveryAttempt"}` as a Delivery, or MalformedPush naming what is wrong."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPush(ErrorCode.INVALID_JSON, f"push body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedPush(ErrorCode.NOT_AN_OBJECT, "push body must be a JSON object with a 'message'")
    message = raw.get("message")
    if not isinstance(message, dict):
        raise MalformedPush(ErrorCode.MISSING_FIELD, "push body has no 'message' object; is this a Pub/Sub push?")
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        raise MalformedPush(ErrorCode.INVALID_FIELD, "message.attributes must be an object of strings")
    message_id = message.get("messageId") or message.get("message_id")
    # Pub/Sub's ids are digits; anything else (only a hand-made push could send it) is not used to name
    # the `_rejected/` record, since it could not be a safe object name.
    message_id = message_id if isinstance(message_id, str) and _SAFE_ID.match(message_id) else None
    attempt = raw.get("deliveryAttempt")
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
        raise MalformedPush(ErrorCode.INVALID_FIELD, f"deliveryAttempt must be a positive integer, got {attempt!r}",
                            attributes=attributes, message_id=message_id)
    data = message.get("data", "")
    try:
        if not isinstance(data, str):
            raise ValueError(f"it is {type(data).__name__}, not a string")
        decoded = base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise MalformedPush(ErrorCode.INVALID_ENCODING, f"message.data is not base64: {exc}",
                            attributes=attributes, message_id=message_id) from None
    return Delivery(data=decoded, attributes=attributes, message_id=message_id, delivery_attempt=attempt)


@router.post("/pubsub/push", summary="Pub/Sub push endpoint: 2xx only once the result is written",
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"application/json": {"schema": PUSH_ENVELOPE_SCHEMA}}}},
             responses={200: {"description": "settled: done, failed (error result written), duplicate or rejected"},
                        400: {"description": "not a push envelope"}, 401: {"description": "no valid token"},
                        403: {"description": "token for another audience or account"},
                        429: {"description": "too many in flight"}, 503: {"description": "not settled; redeliver"}})
async def pubsub_push(request: Request) -> JSONResponse:
    service = request.app.state.service
    if service.verifier is not None:
        await run_in_threadpool(service.verifier.verify, request.headers.get("authorization"))
    runtime = service.ready_runtime()
    if runtime.runner is None:
        raise NotSupported("this service has no results location; start it with --results to accept Pub/Sub push")
    body = await request.body()
    with service.admission.slot():
        try:
            delivery = parse_push_envelope(body)
        except MalformedPush as exc:
            await _record_malformed(runtime.runner, exc)
            raise
        outcome: Outcome = await asyncio.wrap_future(runtime.runner.submit(delivery))
    log.info("push settled: %s", outcome.value, extra={"outcome": outcome.value, **(
        {"task_id": delivery.attributes["task_id"]} if "task_id" in delivery.attributes else {})})
    if not outcome.ack:
        raise TaskError(ErrorCode.MODEL_UNAVAILABLE, "the task could not be settled now (storage or model "
                                                     "unavailable, or shutting down); deliver it again",
                        retryable=True)
    return JSONResponse({"outcome": outcome.value})


async def _record_malformed(runner: Any, exc: MalformedPush) -> None:
    """A malformed envelope whose attributes name a task gets that task's error result, so its
    publisher sees why; without a readable task id nothing is written."""
    task_id = exc.attributes.get("task_id", "")
    if not _SAFE_ID.match(task_id):
        return
    log.warning("malformed push for task %s: %s", task_id, exc.message, extra={"task_id": task_id})
    # The runner has no way to record a given decode error; an empty body records it as invalid_json.
    delivery = Delivery(data=b"", attributes=exc.attributes, message_id=exc.message_id)
    await asyncio.wrap_future(runner.submit(delivery))
