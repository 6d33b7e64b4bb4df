"""The HTTP service as a real server on loopback, on the real Gemma 3 270M: health, the native and
OpenAI-compatible routes (through the official `openai` client), batching under concurrent load,
Pub/Sub push with its write-then-2xx rule, metrics and request ids."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.openai import render_gemma_chat
from worker.app import Runtime, build_runtime
from worker.engine import Engine
from worker.logs import JsonFormatter
from worker.service import create_app
from worker.service_run import BackgroundServer
from worker.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-results")


@pytest.fixture(scope="module")
def runtime(settings: Settings, engine: Engine, results_dir: Path) -> Iterator[Runtime]:
    rt = build_runtime(settings, results=str(results_dir), engine=engine)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def server(runtime: Runtime) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(runtime)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _push_body(data: bytes | str, *, attributes: dict[str, str] | None = None, message_id: str = "m-1") -> dict:
    encoded = data if isinstance(data, str) else base64.b64encode(data).decode()
    return {"message": {"data": encoded, "attributes": attributes or {}, "messageId": message_id,
                        "publishTime": "2026-01-01T00:00:00Z"},
            "subscription": "projects/p/subscriptions/push", "deliveryAttempt": 1}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.json"))


def _metric(http: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_health_and_readiness_of_a_loaded_service(http: httpx.Client) -> None:
    # Given a service whose model is loaded
    # When its health and readiness are asked
    health = http.get("/healthz")
    ready = http.get("/readyz")
    # Then both say ready, with the model, device, GPU and queue facts
    assert health.status_code == 200 and ready.status_code == 200
    body = health.json()
    assert body["status"] == "ready" and body["device"] == "cpu" and body["gpu_available"] is False
    assert body["model"].startswith("gemma-3-270m") and body["queue_depth"] == 0 and body["uptime_s"] >= 0


def test_a_loading_service_is_live_but_not_ready(settings: Settings, engine: Engine) -> None:
    # Given a service whose model is still loading (the loader waits for a signal)
    release = threading.Event()

    def load() -> Runtime:
        release.wait(30)
        return build_runtime(settings, results=None, engine=engine)

    with BackgroundServer(create_app(load, settings=settings)) as srv, httpx.Client(base_url=srv.url) as client:
        # When it is asked at once
        health, ready = client.get("/healthz"), client.get("/readyz")
        early = client.post("/embed", json={"texts": ["too early"]})
        # Then it is live, not ready, and inference says 503 with Retry-After
        assert health.status_code == 200 and health.json()["status"] == "loading"
        assert ready.status_code == 503
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert early.json()["error"]["code"] == "model_unavailable"
        # And once the model is there, it becomes ready
        release.set()
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/readyz").status_code == 200


def test_openai_client_gets_the_engines_answers(server: BackgroundServer, engine: Engine) -> None:
    # Given the official openai client pointed at the service
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    texts = ["The quick brown fox jumps over the lazy dog.", "Gemma runs on Cloud Run."]
    prompt = "The capital of France is"
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    # When it asks for embeddings (its default base64 and floats), a completion and a chat completion
    vectors = [d.embedding for d in client.embeddings.create(model="gemma", input=texts).data]
    floats = client.embeddings.create(model="gemma", input=texts[0], dimensions=64, encoding_format="float")
    completion = client.completions.create(model="gemma", prompt=prompt, max_tokens=6, temperature=0)
    chat = client.chat.completions.create(model="gemma", messages=messages, max_tokens=6)
    models = client.models.list()
    # Then the values are the engine's own for the same inputs
    expected = engine.embed(texts).vectors
    cosines = np.sum(np.asarray(vectors) * expected, axis=1)
    assert cosines.min() >= 0.9999, cosines
    short = np.asarray(floats.data[0].embedding)
    assert short.shape == (64,) and float(short @ engine.embed(texts[:1], dims=64).vectors[0]) >= 0.9999
    direct = engine.generate([prompt], max_new_tokens=6)[0]
    assert completion.choices[0].text == direct.text
    assert completion.usage.prompt_tokens == direct.prompt_tokens
    assert completion.usage.completion_tokens == len(direct.token_ids)
    chat_direct = engine.generate([render_gemma_chat(messages)], max_new_tokens=6)[0]
    assert chat.choices[0].message.content == chat_direct.text and chat.choices[0].message.role == "assistant"
    assert [m.id for m in models.data] == [engine.name]


def test_response_schema_constrains_the_output_natively_and_through_openai(
        http: httpx.Client, server: BackgroundServer) -> None:
    # Given a JSON Schema, asked for on /generate and as OpenAI's response_format
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    # When the service generates under it
    native = http.post("/generate", json={"prompt": "Is the sky blue? JSON:", "max_tokens": 16,
                                          "response_schema": schema})
    chat = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=16,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    # Then both texts are JSON of the schema
    assert native.status_code == 200, native.text
    for text in (native.json()["text"], chat.choices[0].message.content):
        assert isinstance(json.loads(text)["answer"], bool), text


def test_concurrent_requests_share_batches_and_match_lone_answers(http: httpx.Client, server: BackgroundServer) -> None:
    # Given four prompts and four texts, each first sent alone
    prompts = ["Water boils at", "1, 2, 3, 4,", "The three primary colours are", "def add(a, b):"]
    texts = ["alpha beta gamma", "a longer sentence about batching requests together", "x", "Cloud Run GPUs"]
    alone_gen = [http.post("/generate", json={"prompt": p, "max_tokens": 5}).json()["text"] for p in prompts]
    alone_emb = [http.post("/embed", json={"texts": [t]}).json()["embeddings"][0] for t in texts]
    batches_before = _metric(http, "gemma_batch_requests_count", kind="generate")
    singles_before = _metric(http, "gemma_batch_requests_bucket", kind="generate", le="1.0")

    # When they are all sent at once
    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            calls = [client.post("/generate", json={"prompt": p, "max_tokens": 5}) for p in prompts]
            calls += [client.post("/embed", json={"texts": [t]}) for t in texts]
            return [r.json() for r in await asyncio.gather(*calls)]

    answers = asyncio.run(together())
    # Then some engine call carried more than one request, and every answer is the lone one
    batches = _metric(http, "gemma_batch_requests_count", kind="generate") - batches_before
    singles = _metric(http, "gemma_batch_requests_bucket", kind="generate", le="1.0") - singles_before
    assert singles < batches, "no generate batch held more than one request"
    assert [a["text"] for a in answers[:4]] == alone_gen
    for answer, lone in zip(answers[4:], alone_emb):
        assert float(np.dot(answer["embeddings"][0], lone)) >= 0.9999


def test_push_writes_then_acknowledges_and_duplicates_write_nothing(http: httpx.Client, results_dir: Path) -> None:
    # Given a real push envelope carrying an embed task
    task = {"task_id": "push-1", "kind": "embed", "payload": {"texts": ["pushed text"], "dims": 8}}
    body = _push_body(json.dumps(task).encode(), attributes={"task_id": "push-1"})
    # When it is pushed, and then pushed again
    first = http.post("/pubsub/push", json=body)
    written = (results_dir / "adhoc" / "push-1.json").read_bytes()
    again = http.post("/pubsub/push", json=body)
    # Then the first wrote the result before answering 2xx; the duplicate answered 2xx and wrote nothing
    assert first.status_code == 200 and first.json() == {"outcome": "done"}
    result = json.loads(written)
    assert result["status"] == "ok" and result["output"]["dims"] == 8
    assert again.status_code == 200 and again.json() == {"outcome": "duplicate"}
    assert (results_dir / "adhoc" / "push-1.json").read_bytes() == written


def test_push_of_a_bad_task_writes_its_error_and_acknowledges(http: httpx.Client, results_dir: Path) -> None:
    # Given a well-formed push whose task can never succeed (an unknown kind)
    task = {"task_id": "push-bad-kind", "kind": "translate", "payload": {}}
    # When it is pushed
    response = http.post("/pubsub/push", json=_push_body(json.dumps(task).encode()))
    # Then its error result is written and Pub/Sub is told not to redeliver
    assert response.status_code == 200 and response.json() == {"outcome": "failed"}
    result = json.loads((results_dir / "adhoc" / "push-bad-kind.json").read_text())
    assert result["status"] == "error" and result["error"]["code"] == "unknown_kind"


def test_malformed_push_envelopes_answer_400(http: httpx.Client, results_dir: Path) -> None:
    # Given push bodies that are not push envelopes
    before = _files(results_dir)
    not_json = http.post("/pubsub/push", content=b"{oops", headers={"content-type": "application/json"})
    no_message = http.post("/pubsub/push", json={"subscription": "projects/p/subscriptions/s"})
    anonymous = http.post("/pubsub/push", json=_push_body("%%% not base64 %%%"))
    after_anonymous = _files(results_dir)
    # When one of them names its task in the attributes
    named = http.post("/pubsub/push", json=_push_body("%%% not base64 %%%", attributes={"task_id": "push-garbled"}))
    # Then every one is a 400 naming the problem, and only the named one left an error result
    assert [r.status_code for r in (not_json, no_message, anonymous, named)] == [400, 400, 400, 400]
    assert not_json.json()["error"]["code"] == "invalid_json"
    assert no_message.json()["error"]["code"] == "missing_field"
    assert "base64" in anonymous.json()["error"]["message"] and "base64" in named.json()["error"]["message"]
    assert after_anonymous == before
    result = json.loads((results_dir / "adhoc" / "push-garbled.json").read_text())
    assert result["status"] == "error" and result["task_id"] == "push-garbled"


def test_metrics_cover_requests_batches_tokens_errors_and_load(http: httpx.Client, runtime: Runtime) -> None:
    # Given one good request and one refused for a bad parameter (the greedy head's screen built)
    runtime.engine.decoder.ensure_screen()
    paths = ("screened", "unsure", "full")
    rows = sum(_metric(http, "gemma_greedy_head_rows_total", path=path) for path in paths)
    permitted = _metric(http, "gemma_greedy_head_rows_total", path="permitted")
    assert http.post("/generate", json={"prompt": "Hello", "max_tokens": 2}).status_code == 200
    assert http.post("/generate", json={"prompt": "Is water wet?", "max_tokens": 4,
                                        "response_schema": {"type": "boolean"}}).status_code == 200
    assert http.post("/embed", json={"texts": ["x"], "dims": 0}).status_code == 422
    # When the metrics are scraped
    text = http.get("/metrics").text
    # Then requests, batch sizes, queue wait, tokens, errors and model load time are all there
    assert _metric(http, "gemma_http_requests_total", route="/generate", status="200") >= 1
    assert _metric(http, "gemma_batch_requests_count", kind="generate") >= 1
    assert _metric(http, "gemma_queue_wait_seconds_count", kind="generate") >= 1
    assert _metric(http, "gemma_tokens_in_total", kind="generate") >= 1
    assert _metric(http, "gemma_tokens_out_total") >= 1
    assert _metric(http, "gemma_errors_total", code="invalid_parameter") >= 1
    # and the request's two greedy rows, answered by the output layer's screen or in full (CPU)
    assert sum(_metric(http, "gemma_greedy_head_rows_total", path=path) for path in paths) >= rows + 2
    # and the constrained request's rows, whose grammar permitted few words, scored on those alone
    assert _metric(http, "gemma_greedy_head_rows_total", path="permitted") >= permitted + 2
    assert "gemma_model_load_seconds" in text and "gemma_queue_depth" in text


def test_a_temperature_the_sampler_cannot_divide_by_is_a_422_naming_the_smallest(http: httpx.Client) -> None:
    # Given a request whose temperature is above 0 but under the smallest the sampler takes
    answer = http.post("/generate", json={"prompt": "Hello", "max_tokens": 2, "temperature": 1e-45})
    # Then it is refused as a bad parameter, and the service still answers the next request
    assert answer.status_code == 422, answer.text
    assert "0 (greedy) or at least 1e-06" in answer.text and "invalid_parameter" in answer.text
    assert http.post("/generate", json={"prompt": "Hello", "max_tokens": 2, "temperature": 1e-6, "seed": 1}).status_code == 200


def test_request_ids_are_echoed_and_logged_as_json(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    # Given a caller's request id, and a request without one
    caplog.set_level(logging.INFO, logger="worker.http")
    mine = http.get("/healthz", headers={"X-Request-Id": "agent-42"})
    other = http.get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    # Then each answer carries its id, and the access log line is JSON with severity, message and id
    assert mine.headers["x-request-id"] == "agent-42"
    assert other.headers["x-request-id"] != "bad id with spaces" and len(other.headers["x-request-id"]) == 32
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "agent-42"]
    assert records, "no access log line for the request"
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["severity"] == "INFO" and line["request_id"] == "agent-42" and "/healthz 200" in line["message"]
