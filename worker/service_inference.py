"""Synchronous inference straight through the batcher (no store): `POST /generate` and `POST /embed`,
and the two calls the OpenAI-compatible routes share with them. Requests from HTTP and tasks from
Pub/Sub meet in the one batcher, so they ride in the same engine calls."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from schemas.envelope import EmbedPayload, GeneratePayload
from schemas.errors import ErrorCode, TaskError
from schemas.result import EmbedOutput, GenerateOutput, Timings
from worker.app import Runtime
from worker.batcher import TokenBudgetBatcher, Timed
from worker.service_errors import NotSupported

router = APIRouter(tags=["inference"])
# Below this the sampler's logits/temperature overflow to inf; such a temperature is greedy in all but name.
MIN_TEMPERATURE = 1e-6

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text} for status, text in (
        (400, "malformed request"), (413, "over a size limit (body, texts, input tokens)"),
        (422, "a parameter out of range"), (429, "too many requests in flight; see Retry-After"),
        (501, "asked for something this deployment cannot do (response_schema)"),
        (503, "model loading or shutting down; see Retry-After"))}


class GenerateRequest(GeneratePayload):
    """One prompt; the same fields as a `generate` task's payload."""

    response_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema the output must follow (constrained decoding); 501 where unsupported.")


class EmbedRequest(EmbedPayload):
    """Texts to embed; the same fields as an `embed` task's payload."""


class GenerateResponse(GenerateOutput):
    model: str
    timings: Timings


class EmbedResponse(EmbedOutput):
    model: str
    timings: Timings


@dataclass(frozen=True)
class Limits:
    """The service's limits resolved against the loaded engine."""

    max_texts: int
    max_tokens: int
    max_input_tokens: int


def limits_for(request: Request, runtime: Runtime) -> Limits:
    configured = request.app.state.service.config.limits
    engine = runtime.engine
    return Limits(max_texts=configured.max_texts or runtime.settings.max_texts_per_task,
                  max_tokens=min(configured.max_tokens or engine.max_new_tokens, engine.max_new_tokens),
                  max_input_tokens=min(configured.max_input_tokens or engine.max_input_tokens,
                                       engine.max_input_tokens))


def default_max_tokens(request: Request, *, given: int | None, default: int) -> int:
    """An absent max_tokens never exceeds the service's limit; a given one is checked as it is."""
    if given is not None:
        return given
    service = request.app.state.service
    return min(default, limits_for(request, service.ready_runtime()).max_tokens)


async def generate(request: Request, prompt: str, *, max_tokens: int, temperature: float, top_p: float,
                   stop: Sequence[str], seed: int | None, truncate: bool = False,
                   response_schema: dict[str, Any] | None = None) -> tuple[GenerateOutput, Timed, str]:
    """One prompt through the shared batcher: its output, timings and the model's name."""
    service = request.app.state.service
    runtime: Runtime = service.ready_runtime()
    limits = limits_for(request, runtime)
    engine = runtime.engine
    if not isinstance(max_tokens, bool) and isinstance(max_tokens, int) and max_tokens > limits.max_tokens:
        raise TaskError(ErrorCode.MAX_TOKENS_OUT_OF_RANGE,
                        f"max_tokens={max_tokens} is over this service's limit max_tokens={limits.max_tokens}")
    if isinstance(temperature, (int, float)) and 0 < temperature < MIN_TEMPERATURE:
        raise TaskError(ErrorCode.INVALID_PARAMETER, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, "
                                                     f"got {temperature!r}")
    stops = engine.check_generate_args(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop)
    extra = _response_schema_kwargs(runtime.batcher, response_schema)
    limit = min(limits.max_input_tokens, engine.prompt_limit(max_tokens))
    with service.admission.slot():
        items = await run_in_threadpool(engine.tokenize, [prompt], truncate=truncate, limit=limit, what="prompt")
        future = runtime.batcher.submit_generate(items, max_new_tokens=max_tokens, temperature=temperature,
                                                 top_p=top_p, stop=stops, seed=seed, **extra)
        timed: Timed = await asyncio.wrap_future(future)
    g = timed.value[0]
    output = GenerateOutput(text=g.text, finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
                            completion_tokens=len(g.token_ids), truncated=g.truncated)
    service.metrics.tokens_out.inc(output.completion_tokens)
    return output, timed, engine.name


async def embed(request: Request, texts: Sequence[str], *, dims: int | None, normalize: bool = True,
                truncate: bool = False) -> tuple[EmbedOutput, Timed, str]:
    """Texts through the shared batcher: one vector each, in order."""
    service = request.app.state.service
    runtime: Runtime = service.ready_runtime()
    limits = limits_for(request, runtime)
    if len(texts) > limits.max_texts:
        raise TaskError(ErrorCode.TOO_MANY_INPUTS, f"{len(texts)} texts in one request; the limit is "
                                                   f"max_texts_per_request={limits.max_texts}")
    dims = runtime.engine.check_dims(dims)
    with service.admission.slot():
        items = await run_in_threadpool(runtime.engine.tokenize, list(texts), truncate=truncate,
                                        limit=limits.max_input_tokens, what="text")
        future = runtime.batcher.submit_embed(items, dims=dims, normalize=normalize)
        timed: Timed = await asyncio.wrap_future(future)
    out = timed.value
    output = EmbedOutput(embeddings=out.vectors.tolist(), dims=dims, input_tokens=out.input_tokens,
                         truncated=out.truncated)
    return output, timed, runtime.engine.name


def _response_schema_kwargs(batcher: TokenBudgetBatcher, schema: dict[str, Any] | None) -> dict[str, Any]:
    """Constrained decoding is passed through only where the batcher takes it (it is being added)."""
    if schema is None:
        return {}
    if "response_schema" not in inspect.signature(batcher.submit_generate).parameters:
        raise NotSupported("response_schema (JSON-constrained output) is not supported by this service's engine "
                           "yet; omit it and ask for JSON in the prompt instead")
    return {"response_schema": schema}


def _timings(timed: Timed) -> Timings:
    return Timings(queue_ms=round(timed.queue_ms, 2), inference_ms=round(timed.run_ms, 2))


@router.post("/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES,
             summary="Complete one prompt (greedy at temperature 0)")
async def generate_route(body: GenerateRequest, request: Request) -> GenerateResponse:
    max_tokens = default_max_tokens(request, given=body.max_tokens if "max_tokens" in body.model_fields_set
                                    else None, default=body.max_tokens)
    output, timed, model = await generate(
        request, body.prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        stop=body.stop, seed=body.seed, truncate=body.truncate, response_schema=body.response_schema)
    return GenerateResponse(**output.model_dump(), model=model, timings=_timings(timed))


@router.post("/embed", responses={200: {"model": EmbedResponse}, **ERROR_RESPONSES},
             summary="Embed texts: L2-normalised mean-pooled vectors, optionally cut to `dims`")
async def embed_route(body: EmbedRequest, request: Request) -> JSONResponse:
    output, timed, model = await embed(request, body.texts, dims=body.dims, normalize=body.normalize,
                                       truncate=body.truncate)
    # Built by hand: re-validating thousands of floats through a response model costs more than the engine.
    return JSONResponse({**output.model_dump(mode="json"), "model": model,
                         "timings": _timings(timed).model_dump(mode="json")})
