"""What `graph` and `code` tasks share: split a document into chunks that fit the model's input
beside the prompt, send every chunk in one batcher request under one JSON Schema, and turn each
chunk's constrained JSON back into a model (or a clear error when its tokens ran out)."""
from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from schemas.errors import ErrorCode, TaskError
from schemas.graph import MAX_CHUNKS
from worker.constrained import CompiledSchema
from worker.engine import Engine, Generation
from worker.tasks.base import TaskContext

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ChunkedRequest:
    """One document on its way: its chunks (in order), the batcher's future, the grammar they ride under."""

    chunks: list[str]
    future: Future
    schema: CompiledSchema
    max_tokens: int


def chunk_limit(engine: Engine, *, prompt_overhead: int, max_tokens: int, requested: int | None) -> int:
    """Document tokens per chunk: what the input limit leaves beside the prompt and the answer,
    or less when the request asks for smaller chunks."""
    room = min(engine.prompt_limit(max_tokens), engine.max_input_tokens - max_tokens) - prompt_overhead
    if room < 16:
        raise TaskError(ErrorCode.MAX_TOKENS_OUT_OF_RANGE, (
            f"max_tokens={max_tokens} leaves no room for the document beside a {prompt_overhead}-token prompt "
            f"within max_input_tokens={engine.max_input_tokens}; lower max_tokens"))
    return room if requested is None else min(room, requested)


def split_into_chunks(engine: Engine, text: str, *, chunk_tokens: int, what: str) -> list[str]:
    """Consecutive pieces of at most `chunk_tokens` tokens that together are the whole text,
    cut at a line break in the second half of a window when there is one."""
    # A text too long for every chunk allowed is refused before the tokenizer pays for it.
    if len(text) > MAX_CHUNKS * chunk_tokens * engine.max_token_chars:
        _too_many_chunks(what, f"more than {MAX_CHUNKS}", chunk_tokens)
    offsets = engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [start for start, _ in offsets]
    chunks: list[str] = []
    first, begin = 0, 0
    while first < len(starts):
        last = first + chunk_tokens
        if last >= len(starts):
            chunks.append(text[begin:])
            break
        end = starts[last]
        newline = text.rfind("\n", starts[first + chunk_tokens // 2], end)
        if newline > begin:
            end = newline + 1
            last = bisect.bisect_left(starts, end, lo=first + 1)
        chunks.append(text[begin:end])
        first, begin = last, end
    chunks = [c for c in chunks if c.strip()] or [text]
    if len(chunks) > MAX_CHUNKS:
        _too_many_chunks(what, str(len(chunks)), chunk_tokens)
    return chunks


def _too_many_chunks(what: str, count: str, chunk_tokens: int) -> None:
    raise TaskError(ErrorCode.INPUT_TOO_LONG, (
        f"the {what} needs {count} chunks of {chunk_tokens} tokens; the limit is {MAX_CHUNKS} chunks per task. "
        "Split it into several tasks"))


def submit_chunks(ctx: TaskContext, chunks: list[str], *, render: Callable[[str], str], schema: dict,
                  max_tokens: int) -> ChunkedRequest:
    """Check the schema and every prompt now, then queue all chunks as one request so they share a batch."""
    compiled = ctx.engine.check_response_schema(schema)
    prompts = [render(chunk) for chunk in chunks]
    items = ctx.engine.tokenize(prompts, truncate=False, limit=ctx.engine.prompt_limit(max_tokens), what="chunk prompt")
    future = ctx.batcher.submit_generate(items, max_new_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=(),
                                         seed=None, response_schema=schema)
    return ChunkedRequest(chunks=chunks, future=future, schema=compiled, max_tokens=max_tokens)


def parse_chunks(request: ChunkedRequest, out: Sequence[Generation], model: type[M]) -> list[M]:
    """Each chunk's answer as `model`; a chunk whose tokens ran out mid-JSON fails the task, named."""
    parsed = []
    for i, gen in enumerate(out):
        if gen.finish_reason == "length":
            raise TaskError(ErrorCode.OUTPUT_TRUNCATED, (
                f"chunk {i + 1} of {len(out)} used all max_tokens={request.max_tokens} before its JSON was complete; "
                "raise max_tokens or lower chunk_tokens"))
        try:
            parsed.append(model.model_validate(request.schema.parse(gen.text)))
        except ValidationError as exc:
            raise TaskError(ErrorCode.INTERNAL, f"chunk {i + 1} does not fit {model.__name__}: {exc}") from None
    return parsed
