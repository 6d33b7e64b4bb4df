"""Limits at the edge, on a server with tiny limits: each over-limit request gets its 4xx naming the
limit, a full queue gets 429 with Retry-After, and a property-based run over the service's own OpenAPI
document finds no 5xx."""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings as hypothesis_settings
from schemathesis import GenerationMode

from worker.app import Runtime, build_runtime
from worker.batcher import TokenBudgetBatcher
from worker.engine import Engine
from worker.service import ServiceConfig, ServiceLimits, create_app
from worker.service_run import BackgroundServer
from worker.settings import Settings

pytestmark = pytest.mark.slow

LIMITS = ServiceLimits(max_request_bytes=4096, max_texts=3, max_tokens=3, max_queued_requests=2, retry_after_s=2)


@pytest.fixture(scope="module")
def runtime(settings: Settings, engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    # The session's model behind an engine with a small input limit (as --max-input-tokens 48 would give).
    small = Engine(engine.model, max_input_tokens=48, token_budget=engine.token_budget,
                   max_batch_size=engine.max_batch_size, max_new_tokens=engine.max_new_tokens)
    rt = build_runtime(settings, results=str(tmp_path_factory.mktemp("limits-results")), engine=small)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def server(runtime: Runtime) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(runtime, config=ServiceConfig(limits=LIMITS))) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_a_body_over_the_size_limit_is_413(http: httpx.Client) -> None:
    # Given bodies over max_request_bytes, one declared by Content-Length and one streamed without it
    big = {"texts": ["word " * 1000]}
    streamed = (chunk for chunk in [b'{"texts": ["', b"x" * 5000, b'"]}'])
    # When they are posted
    declared = http.post("/embed", json=big)
    chunked = http.post("/embed", content=streamed, headers={"content-type": "application/json"})
    # Then both are 413 naming the limit
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert "max_request_bytes=4096" in _error(response)["message"]
        assert _error(response)["code"] == "message_too_large"


def test_too_many_texts_is_413(http: httpx.Client) -> None:
    response = http.post("/embed", json={"texts": ["a", "b", "c", "d"]})
    assert response.status_code == 413
    assert _error(response)["code"] == "too_many_inputs" and "max_texts_per_request=3" in _error(response)["message"]
    openai_style = http.post("/v1/embeddings", json={"model": "m", "input": ["a", "b", "c", "d"]})
    assert openai_style.status_code == 413 and "max_texts_per_request=3" in _error(openai_style)["message"]


def test_input_over_the_token_limit_is_413(http: httpx.Client) -> None:
    # Given a text of about 100 tokens against a limit of 48
    text = " ".join(f"word{i}" for i in range(60))
    # When it is embedded and used as a prompt
    embedded = http.post("/embed", json={"texts": [text]})
    prompted = http.post("/v1/completions", json={"model": "m", "prompt": text, "max_tokens": 1})
    # Then both are the engine's input_too_long error naming the limit
    for response in (embedded, prompted):
        assert response.status_code == 413
        assert _error(response)["code"] == "input_too_long" and "max_input_tokens=48" in _error(response)["message"]


def test_max_tokens_over_the_limit_is_422(http: httpx.Client) -> None:
    native = http.post("/generate", json={"prompt": "Hi", "max_tokens": 4})
    chat = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 4})
    for response in (native, chat):
        assert response.status_code == 422
        assert _error(response)["code"] == "max_tokens_out_of_range" and "max_tokens=3" in _error(response)["message"]


def test_a_full_queue_answers_429_with_retry_after(server: BackgroundServer) -> None:
    # Given room for two requests in flight
    # When six slow requests arrive at once
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            calls = [client.post("/generate", json={"prompt": f"Count to {i}:", "max_tokens": 3}) for i in range(6)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    # Then the ones over the limit are 429 with Retry-After and the limit named; the rest are answered
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "2"
            assert "max_queued_requests=2" in _error(response)["message"]


def test_response_schema_is_passed_through_or_501(http: httpx.Client, runtime: Runtime) -> None:
    # Given a request for JSON-constrained output, natively and through OpenAI's response_format
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    native = http.post("/generate", json={"prompt": "Answer:", "max_tokens": 3, "response_schema": schema})
    openai_style = http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "Answer"}], "max_tokens": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    # Then it is 501 with a clear message where the batcher cannot constrain output, else it is served
    # (or, with max_tokens=3, refused as output_truncated: the JSON could not close in time)
    supported = "response_schema" in inspect.signature(TokenBudgetBatcher.submit_generate).parameters
    for response in (native, openai_style):
        if supported:
            assert response.status_code == 200 or _error(response)["code"] == "output_truncated", response.text
        else:
            assert response.status_code == 501, response.text
            assert "response_schema" in _error(response)["message"]


def test_generated_requests_never_get_a_5xx(server: BackgroundServer) -> None:
    # Given the service's own OpenAPI document
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/generate", "/embed", "/v1/embeddings", "/v1/completions",
                                               "/v1/chat/completions", "/pubsub/push", "/healthz"}
    deadline = time.monotonic() + 50
    failures: list[str] = []
    # When a few valid and invalid requests per route are generated and sent (bounded in count and time)
    for op in operations:
        # Only a body can be made invalid: routes without one have no negative cases.
        modes = [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if len(op.body) else [])]
        for mode in modes:
            if time.monotonic() > deadline:
                break

            @hypothesis_settings(max_examples=4, deadline=None, database=None, derandomize=True,
                                 phases=[Phase.explicit, Phase.generate],
                                 suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def send(case: schemathesis.Case) -> None:
                response = case.call(base_url=server.url, timeout=60)
                if response.status_code >= 500 and not _declined_response_schema(response):
                    failures.append(f"{op.method.upper()} {op.path} {case.body!r:.300} -> "
                                    f"{response.status_code} {response.text[:300]}")

            send()
    # Then no request made the service fail
    assert not failures, "\n".join(failures)


def _declined_response_schema(response: object) -> bool:
    """501 for response_schema is this deployment's documented answer, not a failure."""
    return response.status_code == 501 and "response_schema" in response.json()["error"]["message"]
