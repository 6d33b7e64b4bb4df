"""The result: one JSON object per task, written once under the results prefix."""
from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import SCHEMA_VERSION
from schemas.errors import ErrorInfo
from schemas.graph import CodeAnalysis, KnowledgeGraph


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


class GraphOutput(_Frozen):
    graph: KnowledgeGraph
    mermaid: str = Field(description="The graph as Mermaid `graph TD` text, for a person to look at.")
    chunks: int = Field(description="How many pieces the document was extracted in (1 when it fit at once).")
    node_embeddings: list[list[float]] | None = Field(
        default=None, description="With embed_nodes: one vector per node, in the order of graph.nodes.")
    prompt_tokens: int
    completion_tokens: int


class CodeOutput(_Frozen):
    analysis: CodeAnalysis
    language_from: Literal["payload", "filename", "content", "model"] = Field(
        description="Where analysis.language came from: the request, the file name, the text's own signs, or the model.")
    chunks: int = Field(description="How many pieces the source was analysed in (1 when it fit at once).")
    prompt_tokens: int
    completion_tokens: int


class Result(_Frozen):
    schema_version: str = SCHEMA_VERSION
    task_id: str
    custom_id: str | None = None
    batch_id: str | None = None
    kind: str | None = Field(default=None, description="The task's kind, when it could be read.")
    status: ResultStatus
    output: EmbedOutput | GenerateOutput | GraphOutput | CodeOutput | None = None
    error: ErrorInfo | None = None
    model: str | None = None
    timings: Timings = Field(default_factory=Timings)
    attempt: int = 1
    cached: bool = Field(default=False, description=(
        "true: the output was taken from an earlier identical task's result, without running the model."))
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
