"""Error codes shared by every door (pull, push, HTTP, CLI) and the error carried by a result."""
from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    """Why a task failed. Each code names one cause a caller can act on."""

    INVALID_JSON = "invalid_json"
    INVALID_ENCODING = "invalid_encoding"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_KIND = "unknown_kind"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    EMPTY_INPUT = "empty_input"
    INPUT_TOO_LONG = "input_too_long"
    TOO_MANY_INPUTS = "too_many_inputs"
    MAX_TOKENS_OUT_OF_RANGE = "max_tokens_out_of_range"
    INVALID_PARAMETER = "invalid_parameter"
    UNSAFE_IDENTIFIER = "unsafe_identifier"
    MESSAGE_TOO_LARGE = "message_too_large"
    INVALID_RESPONSE_SCHEMA = "invalid_response_schema"
    OUTPUT_TRUNCATED = "output_truncated"
    UNSUPPORTED_KIND = "unsupported_kind"
    MODEL_UNAVAILABLE = "model_unavailable"
    OUT_OF_MEMORY = "out_of_memory"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    TOO_MANY_DELIVERIES = "too_many_deliveries"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_BATCH = "unknown_batch"
    BATCH_CONFLICT = "batch_conflict"
    RESULTS_PENDING = "results_pending"
    PUBLISH_FAILED = "publish_failed"
    INTERNAL = "internal"


# A retry helps only when the cause is outside the task itself.
RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {ErrorCode.MODEL_UNAVAILABLE, ErrorCode.OUT_OF_MEMORY, ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.INTERNAL,
     ErrorCode.RESULTS_PENDING, ErrorCode.PUBLISH_FAILED}
)


class ErrorInfo(BaseModel):
    """The error part of a result: a code, a message a person can act on, and whether a retry can help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: ErrorCode
    message: str
    retryable: bool = False


class TaskError(Exception):
    """An error that becomes an error result (or a 4xx) instead of a traceback."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.retryable = code in RETRYABLE_CODES if retryable is None else retryable

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, retryable=self.retryable)
