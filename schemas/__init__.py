"""The contract between agents, the CLI and the worker. Depends on pydantic only."""
from __future__ import annotations

from schemas.codec import PUBSUB_MAX_MESSAGE_BYTES, DecodeError, decode_envelope, validate_envelope
from schemas.envelope import (
    ENVELOPE_ADAPTER,
    SCHEMA_VERSION,
    CodePayload,
    CodeTask,
    EmbedPayload,
    EmbedTask,
    Envelope,
    GeneratePayload,
    GenerateTask,
    GraphPayload,
    GraphTask,
    TaskKind,
)
from schemas.errors import ErrorCode, ErrorInfo, TaskError
from schemas.result import EmbedOutput, GenerateOutput, Result, ResultStatus, Timings

__all__ = [
    "ENVELOPE_ADAPTER", "PUBSUB_MAX_MESSAGE_BYTES", "SCHEMA_VERSION",
    "CodePayload", "CodeTask", "DecodeError", "EmbedOutput", "EmbedPayload", "EmbedTask", "Envelope",
    "ErrorCode", "ErrorInfo", "GenerateOutput", "GeneratePayload", "GenerateTask", "GraphPayload", "GraphTask",
    "Result", "ResultStatus", "TaskError", "TaskKind", "Timings", "decode_envelope", "validate_envelope",
]
