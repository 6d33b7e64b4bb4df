"""Synchronous inference: `POST /generate`, `/embed`, `/graph` and `/code` run the same task handlers
as Pub/Sub tasks (worker/tasks), straight through the shared batcher and without the store. So a
request means exactly what the same payload means as a task, and HTTP requests and pulled tasks
ride in the same engine calls."""
from __future__ import annotations

import asyncio
import inspect
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from schemas.envelope import (CodePayload, CodeTask, EmbedPayload, EmbedTask, GeneratePayload, GenerateTask,
                              GraphPayload, GraphTask)
from schemas.errors import ErrorCode, TaskError
from schemas.result import CodeOutput, EmbedOutput, GenerateOutput, GraphOutput, Timings
from worker.app import Runtime
from worker.batcher import Timed
from worker.service_errors import NotSupported
from worker.tasks import TaskContext, start_task

router = APIRouter(tags=["inference"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text} for status, text in (
        (400, "malformed request"), (413, "over a size limit (body, texts, input tokens)"),
        (422, "a parameter out of range, or constrained output cut short by max_tokens"),
        (429, "too many requests in flight; see Retry-After"),
        (501, "asked for something this deployment cannot do (response_schema)"),
        (503, "model loading or shutting down; see Retry-After"))}

AnyTask = EmbedTask | GenerateTask | GraphTask | CodeTask


@dataclass(frozen=True)
class Limits:
    """The service's limits resolved against the loaded engine (input tokens are the engine's own)."""

    max_texts: int
    max_tokens: int


def limits_for(request: Request, runtime: Runtime) -> Limits:
    configured = request.app.state.service.config.limits
    engine = runtime.engine
    return Limits(max_texts=configured.max_texts or runtime.settings.max_texts_per_task,
                  max_tokens=min(configured.max_tokens or engine.max_new_tokens, engine.max_new_tokens))


def with_default_max_tokens(request: Request, task: AnyTask, *, given: bool) -> AnyTask:
    """A max_tokens the caller left out never exceeds the service's limit; a given one is checked as is."""
    payload = task.payload
    if given or not hasattr(payload, "max_tokens"):
        return task
    limit = limits_for(request, request.app.state.service.ready_runtime()).max_tokens
    if payload.max_tokens <= limit:
        return task
    return task.model_copy(update={"payload": payload.model_copy(update={"max_tokens": limit})})


def check_edge_limits(request: Request, task: AnyTask) -> None:
    """What the service refuses before the task handler sees the request, each naming its limit."""
    runtime: Runtime = request.app.state.service.ready_runtime()
    limits = limits_for(request, runtime)
    p = task.payload
    if isinstance(p, EmbedPayload) and len(p.texts) > limits.max_texts:
        raise TaskError(ErrorCode.TOO_MANY_INPUTS, f"{len(p.texts)} texts in one request; the limit is "
                                                   f"max_texts_per_request={limits.max_texts}")
    max_tokens = getattr(p, "max_tokens", None)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise TaskError(ErrorCode.MAX_TOKENS_OUT_OF_RANGE,
                        f"max_tokens={max_tokens} is over this service's limit max_tokens={limits.max_tokens}")
    # (a temperature the sampler cannot divide by is the engine's to refuse: check_generate_args)
    if isinstance(p, GeneratePayload) and getattr(p, "response_schema", None) is not None \
            and not _takes_response_schema(runtime):
        raise NotSupported("response_schema (JSON-constrained output) is not supported by this service's "
                           "engine yet; omit it and ask for JSON in the prompt instead")


def _takes_response_schema(runtime: Runtime) -> bool:
    """Constrained decoding is passed through only where the batcher takes it."""
    return "response_schema" in inspect.signature(runtime.batcher.submit_generate).parameters


async def run_task(request: Request, task: AnyTask) -> tuple[BaseModel, Timed, str]:
    """One task now: the handler validates and tokenizes (off the event loop), the shared batcher runs
    it, the handler builds the output. Returns the output, its timings and the model's name."""
    service = request.app.state.service
    check_edge_limits(request, task)
    runtime: Runtime = service.ready_runtime()
    ctx = TaskContext(settings=runtime.settings, engine=runtime.engine, batcher=runtime.batcher)
    with service.admission.slot():
        started = await run_in_threadpool(start_task, task, ctx)
        timed: Timed = await asyncio.wrap_future(started.future)
        output = await run_in_threadpool(started.finish, timed.value)
    tokens_out = getattr(output, "completion_tokens", 0)
    if tokens_out:
        service.metrics.tokens_out.inc(tokens_out)
    return output, timed, runtime.engine.name


def new_task_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def _timings(timed: Timed) -> dict[str, Any]:
    return Timings(queue_ms=round(timed.queue_ms, 2), inference_ms=round(timed.run_ms, 2)).model_dump(mode="json")


async def _answer(request: Request, task: AnyTask, *, given_max_tokens: bool = True) -> JSONResponse:
    task = with_default_max_tokens(request, task, given=given_max_tokens)
    output, timed, model = await run_task(request, task)
    # Built by hand: re-validating thousands of floats through a response model costs more than the engine.
    return JSONResponse({**output.model_dump(mode="json"), "model": model, "timings": _timings(timed)})


class GenerateResponse(GenerateOutput):
    model: str
    timings: Timings


class EmbedResponse(EmbedOutput):
    model: str
    timings: Timings


class GraphResponse(GraphOutput):
    model: str
    timings: Timings


class CodeResponse(CodeOutput):
    model: str
    timings: Timings


@router.post("/generate", responses={200: {"model": GenerateResponse}, **ERROR_RESPONSES},
             summary="Complete one prompt (greedy at temperature 0); with response_schema, JSON of it")
async def generate_route(body: GeneratePayload, request: Request) -> JSONResponse:
    task = GenerateTask(task_id=new_task_id(), payload=body)
    return await _answer(request, task, given_max_tokens="max_tokens" in body.model_fields_set)


@router.post("/embed", responses={200: {"model": EmbedResponse}, **ERROR_RESPONSES},
             summary="Embed texts: L2-normalised mean-pooled vectors, optionally cut to `dims`")
async def embed_route(body: EmbedPayload, request: Request) -> JSONResponse:
    return await _answer(request, EmbedTask(task_id=new_task_id(), payload=body))


@router.post("/graph", responses={200: {"model": GraphResponse}, **ERROR_RESPONSES},
             summary="A document as a knowledge graph (nodes, edges, Mermaid), as a `graph` task")
async def graph_route(body: GraphPayload, request: Request) -> JSONResponse:
    task = GraphTask(task_id=new_task_id(), payload=body)
    return await _answer(request, task, given_max_tokens="max_tokens" in body.model_fields_set)


@router.post("/code", responses={200: {"model": CodeResponse}, **ERROR_RESPONSES},
             summary="Source code analysed (entities, dependencies, issues), as a `code` task")
async def code_route(body: CodePayload, request: Request) -> JSONResponse:
    task = CodeTask(task_id=new_task_id(), payload=body)
    return await _answer(request, task, given_max_tokens="max_tokens" in body.model_fields_set)
