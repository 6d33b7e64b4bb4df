"""The result: one JSON object per task, written once under the results prefix."""
from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import SCHEMA_VERSION
from schemas.errors import ErrorInfo


class ResultStatus(StrEnum):
    OK = "ok"
    ERROR = "error"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Timings(_Frozen):
    queue_ms: float | None = None
    inference_ms: float | None = None
    total_ms: float | None = None


class EmbedOutput(_Frozen):
    embeddings: list[list[float]]
    dims: int
    input_tokens: list[int]
    truncated: list[bool]


class GenerateOutput(_Frozen):
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    truncated: bool = False


class Result(_Frozen):
    schema_version: str = SCHEMA_VERSION
    task_id: str
    custom_id: str | None = None
    batch_id: str | None = None
    kind: str | None = Field(default=None, description="The task's kind, when it could be read.")
    status: ResultStatus
    output: EmbedOutput | GenerateOutput | None = None
    error: ErrorInfo | None = None
    model: str | None = None
    timings: Timings = Field(default_factory=Timings)
    attempt: int = 1
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
