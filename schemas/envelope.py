"""The task envelope: what agents and the CLI publish, one task per message."""
from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, StringConstraints, TypeAdapter,
                      model_serializer)

SCHEMA_VERSION = "1"
SUPPORTED_SCHEMA_VERSIONS: frozenset[str] = frozenset({SCHEMA_VERSION})

# Identifiers become parts of object names, so they may hold no path separators,
# no "..", no control characters and nothing that starts with a dot.
SAFE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:=+-]{0,127}$"
SafeId = Annotated[str, StringConstraints(pattern=SAFE_ID_PATTERN)]
NonEmptyText = Annotated[str, StringConstraints(min_length=1)]


class TaskKind(StrEnum):
    EMBED = "embed"
    GENERATE = "generate"
    GRAPH = "graph"
    CODE = "code"


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EmbedPayload(_Payload):
    texts: list[NonEmptyText] = Field(min_length=1, description="Texts to embed, one vector each.")
    dims: int | None = Field(default=None, ge=1, description="Matryoshka truncation to this many dimensions.")
    normalize: bool = True
    truncate: bool = Field(default=False, description="Cut over-long texts at the input limit instead of failing.")


class GeneratePayload(_Payload):
    prompt: NonEmptyText
    max_tokens: int = Field(default=128, ge=1, description="Most new tokens to generate.")
    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False,
                               description="0 means greedy; otherwise at least 1e-6 (a smaller one would overflow the sampler).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[NonEmptyText] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    truncate: bool = False
    response_schema: dict[str, Any] | None = Field(
        default=None, description="A JSON Schema object: the text is then JSON of this schema by construction "
        "(constrained decoding), or the task fails with output_truncated when max_tokens runs out first.")


# Large enough that the per-chunk JSON (schemas/graph.py) closes for real documents; see docs/CONSTRAINED.md.
GRAPH_MAX_TOKENS = 384
CODE_MAX_TOKENS = 384
ChunkTokens = Annotated[int, Field(ge=16, description=(
    "Most document tokens per chunk; longer documents are split, extracted in one batch and merged. "
    "Default: what the model's input limit leaves beside the prompt and max_tokens."))]


class GraphPayload(_Payload):
    text: NonEmptyText = Field(description="The document to turn into a knowledge graph.")
    title: str | None = Field(default=None, max_length=200)
    embed_nodes: bool = Field(default=False, description="Also return one embedding per node.")
    max_tokens: int = Field(default=GRAPH_MAX_TOKENS, ge=1, description="Most new tokens per chunk's JSON.")
    chunk_tokens: ChunkTokens | None = None


class CodePayload(_Payload):
    source: NonEmptyText = Field(description="Source code to analyse.")
    filename: str | None = Field(default=None, max_length=512)
    language: str | None = Field(default=None, min_length=1, max_length=20,
                                 description="Guessed from filename or content when absent.")
    max_tokens: int = Field(default=CODE_MAX_TOKENS, ge=1, description="Most new tokens per chunk's JSON.")
    chunk_tokens: ChunkTokens | None = None


class _EnvelopeBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal["1"] = SCHEMA_VERSION
    task_id: SafeId = Field(description="Idempotency key: one result object per task id.")
    batch_id: SafeId | None = None
    custom_id: Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$")] | None = Field(
        default=None, description="The caller's own key, echoed in the result (no control characters)."
    )
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    cache: bool = Field(default=True, description=(
        "false: always run inference and do not store this result in the cache. With true, a greedy or "
        "seeded task identical to one already answered gets that answer again (the result says cached)."))

    @model_serializer(mode="wrap")
    def _written_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """`cache` is written only when false, so a worker from before the field (which refuses unknown
        fields) still reads every envelope that does not opt out: publishers may be upgraded first."""
        data = handler(self)
        if self.cache:
            data.pop("cache", None)
        return data


class EmbedTask(_EnvelopeBase):
    kind: Literal["embed"] = "embed"
    payload: EmbedPayload


class GenerateTask(_EnvelopeBase):
    kind: Literal["generate"] = "generate"
    payload: GeneratePayload


class GraphTask(_EnvelopeBase):
    kind: Literal["graph"] = "graph"
    payload: GraphPayload


class CodeTask(_EnvelopeBase):
    kind: Literal["code"] = "code"
    payload: CodePayload


Envelope = Annotated[Union[EmbedTask, GenerateTask, GraphTask, CodeTask], Field(discriminator="kind")]
ENVELOPE_ADAPTER: TypeAdapter[EmbedTask | GenerateTask | GraphTask | CodeTask] = TypeAdapter(Envelope)
