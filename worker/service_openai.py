"""OpenAI-compatible routes, so the official client works by changing its base URL. Request bodies are
mapped exactly as OpenAI batch lines are (schemas/openai.py) and answers are built by the same code as
batch output lines; the differences from OpenAI (greedy when temperature is absent, `model` ignored,
no streaming) are the batch contract's."""
from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import ErrorCode, TaskError
from schemas.openai import AnyTask, envelope_from_openai_line, openai_output_line
from schemas.result import Result, ResultStatus
from worker.service_inference import ERROR_RESPONSES, new_task_id, run_task, with_default_max_tokens

router = APIRouter(prefix="/v1", tags=["openai"])


class _Open(BaseModel):
    # Unknown fields reach the mapping, which refuses any it cannot honour with a message naming it.
    model_config = ConfigDict(extra="allow")


class CompletionRequest(_Open):
    model: str | None = Field(default=None, description="Ignored: the service runs one model.")
    prompt: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, description="Absent means 0 (greedy), unlike OpenAI's 1.")
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatCompletionRequest(_Open):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = Field(
        default=None, description='{"type": "json_schema", "json_schema": {"schema": ...}} constrains the output '
                                  "(501 where the engine cannot); text and json_object are also accepted.")


class EmbeddingsRequest(_Open):
    model: str | None = None
    input: str | list[str]
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] | None = None


@router.post("/completions", responses=ERROR_RESPONSES, summary="OpenAI-compatible text completion")
async def completions(body: CompletionRequest, request: Request) -> JSONResponse:
    raw = await request.json()
    schema = _pop_response_schema(raw)
    task = _as_task(raw, url="/v1/completions", response_schema=schema)
    return await _complete(request, task, fmt="completions", given_max=raw.get("max_tokens") is not None)


@router.post("/chat/completions", responses=ERROR_RESPONSES, summary="OpenAI-compatible chat (Gemma's turn format)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse:
    raw = await request.json()
    schema = _pop_response_schema(raw)
    task = _as_task(raw, url="/v1/chat/completions", response_schema=schema)
    given = raw.get("max_tokens") is not None or raw.get("max_completion_tokens") is not None
    return await _complete(request, task, fmt="chat.completions", given_max=given)


@router.post("/embeddings", responses=ERROR_RESPONSES, summary="OpenAI-compatible embeddings (float or base64)")
async def embeddings(body: EmbeddingsRequest, request: Request) -> JSONResponse:
    raw = await request.json()
    # The official client asks for base64 unless told otherwise; the batch mapping knows only floats.
    encoding = raw.pop("encoding_format", None) or "float"
    task = _as_task(raw, url="/v1/embeddings")
    output, _, model = await run_task(request, task)
    answer = _body(task, output, model=model, fmt="embeddings")
    if encoding == "base64":
        for item in answer["data"]:
            item["embedding"] = base64.b64encode(np.asarray(item["embedding"], dtype="<f4").tobytes()).decode()
    return JSONResponse(answer)


@router.get("/models", summary="The one model this service runs")
async def models(request: Request) -> dict[str, Any]:
    service = request.app.state.service
    name = service.runtime.engine.name if service.runtime else service.settings.model
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": service.created, "owned_by": "gemma-batch"}]}


async def _complete(request: Request, task: AnyTask, *, fmt: str, given_max: bool) -> JSONResponse:
    task = with_default_max_tokens(request, task, given=given_max)
    output, _, model = await run_task(request, task)
    return JSONResponse(_body(task, output, model=model, fmt=fmt))


def _as_task(raw: dict[str, Any], *, url: str, response_schema: dict[str, Any] | None = None) -> AnyTask:
    """The request body as the batch contract's envelope: same validation, same messages."""
    line = {"custom_id": "http", "method": "POST", "url": url, "body": raw}
    task, _ = envelope_from_openai_line(line, batch_id=None, task_id=new_task_id())
    if response_schema is None:
        return task
    return task.model_copy(update={"payload": task.payload.model_copy(update={"response_schema": response_schema})})


def _body(task: AnyTask, output: BaseModel, *, model: str, fmt: str) -> dict[str, Any]:
    result = Result(task_id=task.task_id, kind=task.kind, status=ResultStatus.OK, output=output, model=model)
    return openai_output_line(result, fmt=fmt)["response"]["body"]


def _pop_response_schema(raw: dict[str, Any]) -> dict[str, Any] | None:
    """`response_format` as the JSON Schema for constrained decoding (None for plain text)."""
    fmt = raw.pop("response_format", None)
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise TaskError(ErrorCode.INVALID_PARAMETER, "body.response_format.json_schema.schema must be a JSON "
                                                         "Schema object")
        return schema
    raise TaskError(ErrorCode.INVALID_PARAMETER, f"body.response_format.type must be text, json_object or "
                                                 f"json_schema, got {kind!r}")
