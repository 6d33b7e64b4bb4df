"""Message bytes and attributes into an envelope, or a typed decode error. Shared by pull and push."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from schemas.envelope import ENVELOPE_ADAPTER, SAFE_ID_PATTERN, SUPPORTED_SCHEMA_VERSIONS, TaskKind
from schemas.errors import ErrorCode, TaskError

PUBSUB_MAX_MESSAGE_BYTES = 10_000_000
_SAFE_ID = re.compile(SAFE_ID_PATTERN)
_EMPTY_INPUT_FIELDS = {"texts", "prompt", "text", "source"}


class DecodeError(TaskError):
    """A message that can never become a task. Carries what could be read, for the error result."""

    def __init__(self, code: ErrorCode, message: str, *, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__(code, message, retryable=False)
        fields = fields or {}
        self.task_id: str | None = _safe_or_none(fields.get("task_id"))
        self.batch_id: str | None = _safe_or_none(fields.get("batch_id"))
        custom_id = fields.get("custom_id")
        self.custom_id: str | None = custom_id if isinstance(custom_id, str) and len(custom_id) <= 512 \
            and custom_id.isprintable() else None
        kind = fields.get("kind")
        self.kind: str | None = kind if isinstance(kind, str) and kind in TaskKind.__members__.values() else None


def _safe_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and _SAFE_ID.match(value) else None


def decode_envelope(
    data: bytes, attributes: Mapping[str, str] | None = None, *, max_bytes: int = PUBSUB_MAX_MESSAGE_BYTES
):
    """Decode one message. Attributes may carry `task_id`, `batch_id`, `custom_id` when the body cannot."""
    known: dict[str, Any] = dict(attributes or {})
    if len(data) > max_bytes:
        raise DecodeError(
            ErrorCode.MESSAGE_TOO_LARGE, f"message is {len(data)} bytes; the limit is max_bytes={max_bytes}", fields=known
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(ErrorCode.INVALID_ENCODING, f"message is not UTF-8: {exc.reason} at byte {exc.start}", fields=known) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(ErrorCode.INVALID_JSON, f"message is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", fields=known) from None
    if not isinstance(raw, dict):
        raise DecodeError(ErrorCode.NOT_AN_OBJECT, f"message must be a JSON object, got {type(raw).__name__}", fields=known)
    return validate_envelope(raw, fallback=known)


def validate_envelope(raw: dict[str, Any], *, fallback: Mapping[str, Any] | None = None):
    """Validate an already-parsed envelope object, mapping each failure onto its own error code."""
    known = {**(fallback or {}), **{k: raw[k] for k in ("task_id", "batch_id", "custom_id", "kind") if k in raw}}
    version = raw.get("schema_version", "1")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(sorted(SUPPORTED_SCHEMA_VERSIONS))
        raise DecodeError(
            ErrorCode.UNSUPPORTED_SCHEMA_VERSION, f"schema_version {version!r} is not supported (supported: {supported})", fields=known
        )
    if "kind" in raw and raw["kind"] not in TaskKind.__members__.values():
        kinds = ", ".join(k.value for k in TaskKind)
        raise DecodeError(ErrorCode.UNKNOWN_KIND, f"kind {raw['kind']!r} is not one of: {kinds}", fields=known)
    try:
        return ENVELOPE_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        code, message = classify_validation_error(exc)
        raise DecodeError(code, message, fields=known) from None


def classify_validation_error(exc: ValidationError) -> tuple[ErrorCode, str]:
    """The first problem of a validation error, as an error code and a readable message."""
    err = exc.errors(include_url=False)[0]
    # Discriminated unions put the tag in the location ("embed", "payload", "texts"); drop it.
    loc = [str(p) for p in err["loc"] if str(p) not in TaskKind.__members__.values()]
    field = ".".join(loc) or "envelope"
    kind = err["type"]
    leaf = loc[-1] if loc else ""
    if kind in ("missing", "union_tag_not_found"):
        name = field if kind == "missing" else "kind"
        return ErrorCode.MISSING_FIELD, f"required field {name!r} is missing"
    if leaf in ("task_id", "batch_id") and kind == "string_pattern_mismatch":
        return ErrorCode.UNSAFE_IDENTIFIER, (
            f"{leaf} must be 1-128 characters of letters, digits and _.:=+- starting with a letter or digit"
        )
    if leaf == "custom_id" and kind == "string_pattern_mismatch":
        return ErrorCode.UNSAFE_IDENTIFIER, "custom_id must not contain control characters"
    if kind in ("string_too_short", "too_short") and (leaf in _EMPTY_INPUT_FIELDS or (loc[-2:-1] and loc[-2] in _EMPTY_INPUT_FIELDS)):
        return ErrorCode.EMPTY_INPUT, f"{field} must not be empty"
    if leaf == "response_schema" or "response_schema" in loc[:-1]:
        return ErrorCode.INVALID_RESPONSE_SCHEMA, (
            f"{field}: {err['msg']}; response_schema must be a JSON Schema object")
    if leaf == "max_tokens":
        return ErrorCode.MAX_TOKENS_OUT_OF_RANGE, f"max_tokens: {err['msg']}"
    if leaf in ("temperature", "top_p", "dims", "seed", "stop", "chunk_tokens"):
        return ErrorCode.INVALID_PARAMETER, f"{field}: {err['msg']}"
    return ErrorCode.INVALID_FIELD, f"{field}: {err['msg']}"
