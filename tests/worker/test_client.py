"""The agent client: retries with backoff (honouring Retry-After), the fallback when the service is
down, real answers from the live service, publishing tasks to the Pub/Sub emulator, and the example
graph agent run as a script."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.cloud import pubsub_v1

from schemas.errors import TaskError
from tests.fixtures.pipeline import new_topic
from tests.fixtures.services import TEST_PROJECT
from worker.app import Runtime, build_runtime
from worker.client import GemmaClient, GemmaClientError, default_publisher, publish_task
from worker.engine import Engine
from worker.service import create_app
from worker.service_run import BackgroundServer
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = "Ada Lovelace worked with Charles Babbage in London on the Analytical Engine."


@pytest.fixture(scope="module")
def runtime(settings: Settings, engine: Engine) -> Iterator[Runtime]:
    rt = build_runtime(settings, results=None, engine=engine)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def server(runtime: Runtime) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(runtime)) as srv:
        yield srv


@pytest.fixture
def closed_url() -> str:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Counting(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return await self.inner.handle_async_request(request)


def test_a_down_service_is_retried_then_the_fallback_answers(closed_url: str) -> None:
    # Given a client for a service that is down, with two retries and a fallback
    transport = Counting(httpx.AsyncHTTPTransport())
    seen: list[tuple[str, dict]] = []

    async def fallback(path: str, body: dict) -> dict:
        seen.append((path, body))
        return {"text": "from the fallback"}

    async def call() -> dict:
        async with GemmaClient(closed_url, retries=2, backoff_s=0.01, fallback=fallback, transport=transport) as c:
            return await c.generate("hello", max_tokens=3)

    # When it is asked to generate
    answer = asyncio.run(call())
    # Then it tried three times, then the fallback answered with the request it could not send
    assert transport.calls == 3
    assert answer == {"text": "from the fallback"}
    assert seen == [("/generate", {"prompt": "hello", "max_tokens": 3})]


def test_without_a_fallback_a_down_service_is_a_clear_error(closed_url: str) -> None:
    async def call() -> None:
        async with GemmaClient(closed_url, retries=1, backoff_s=0.01) as c:
            await c.embed(["x"])

    with pytest.raises(GemmaClientError) as caught:
        asyncio.run(call())
    assert caught.value.code == "unreachable" and caught.value.status is None and caught.value.retryable


def test_retry_after_is_honoured_and_caller_errors_are_not_retried() -> None:
    # Given a service that first says 429 with Retry-After: 1, then answers; and one that says 422
    answers = iter([httpx.Response(429, headers={"Retry-After": "1"}, json={"error": {"code": "busy"}}),
                    httpx.Response(200, json={"text": "ok"})])
    busy = Counting(httpx.MockTransport(lambda request: next(answers)))
    wrong = Counting(httpx.MockTransport(lambda request: httpx.Response(
        422, json={"error": {"code": "invalid_parameter", "message": "top_p must be in (0, 1]"}})))

    async def call(transport: Counting) -> dict:
        async with GemmaClient("http://gemma.test", retries=3, backoff_s=0.01, transport=transport,
                               fallback=lambda path, body: {"text": "fallback"}) as c:
            return await c.generate("hi", top_p=2)

    # When each is called
    started = time.monotonic()
    assert asyncio.run(call(busy)) == {"text": "ok"}
    waited = time.monotonic() - started
    with pytest.raises(GemmaClientError) as caught:
        asyncio.run(call(wrong))
    # Then the client waited as asked before retrying; the caller's mistake raised at once, no fallback
    assert busy.calls == 2 and waited >= 0.9
    assert wrong.calls == 1 and caught.value.status == 422 and caught.value.code == "invalid_parameter"


@pytest.mark.slow
def test_the_client_gets_answers_from_the_live_service(server: BackgroundServer, engine: Engine) -> None:
    # Given a client for the running service
    async def call() -> tuple[dict, dict, dict]:
        async with GemmaClient(server.url, retries=1) as c:
            return await asyncio.gather(c.generate("The sky is", max_tokens=4), c.embed(["a", "b"], dims=16),
                                        c.chat([{"role": "user", "content": "Hi"}], max_tokens=3))

    # When it generates, embeds and chats
    generated, embedded, chat = asyncio.run(call())
    # Then the answers are the engine's
    assert generated["text"] == engine.generate(["The sky is"], max_new_tokens=4)[0].text
    assert embedded["dims"] == 16 and len(embedded["embeddings"]) == 2
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] >= 1


@pytest.mark.emulator
def test_publish_task_puts_a_valid_envelope_on_the_topic(pubsub_emulator) -> None:
    # Given a topic and its subscription on the emulator
    topic, subscription = new_topic(TEST_PROJECT)
    # When an agent publishes a task without an id, and tries one with a bad payload
    task_id = publish_task(topic, {"kind": "embed", "payload": {"texts": ["published"]}, "batch_id": "b-1"})
    publisher = default_publisher(os.environ.get("PUBSUB_EMULATOR_HOST"))
    made = default_publisher.cache_info().misses
    publish_task(topic, {"kind": "embed", "payload": {"texts": ["second"]}})
    assert default_publisher.cache_info().misses == made  # no new client for the second task
    with pytest.raises(TaskError) as caught:
        publish_task(topic, {"kind": "embed", "payload": {}})
    # Then the valid one arrives with its id in the body and the attributes; the bad one was never sent
    subscriber = pubsub_v1.SubscriberClient()
    try:
        received = subscriber.pull(subscription=subscription, max_messages=10, timeout=30).received_messages
    finally:
        subscriber.close()
    # (both valid ones went through the process's one pooled publisher, not a client per task)
    assert default_publisher(os.environ.get("PUBSUB_EMULATOR_HOST")) is publisher
    assert len(received) == 2
    message = next(r.message for r in received if json.loads(r.message.data)["task_id"] == task_id)
    assert json.loads(message.data)["task_id"] == task_id and task_id.startswith("t-")
    assert dict(message.attributes) == {"task_id": task_id, "kind": "embed", "batch_id": "b-1"}
    assert caught.value.code.value == "missing_field"


def _run_example(url: str, tmp_path: Path, *extra: str) -> dict:
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    done = subprocess.run([sys.executable, str(REPO / "examples" / "graph_agent.py"), str(doc), "--url", url,
                           *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_graph_agent_example_uses_the_service_or_its_fallback(server: BackgroundServer, closed_url: str,
                                                              tmp_path: Path) -> None:
    # Given a short document
    # When the example agent runs against the live service (its /graph route), and against one that is down
    live = _run_example(server.url, tmp_path, "--max-tokens", "160")
    down = _run_example(closed_url, tmp_path, "--retries", "1")
    # Then the first graph came from the model, the second from the local fallback (names that co-occur)
    assert live["source"] == "model" and live["nodes"] and live["mermaid"].startswith("graph TD")
    assert {n["id"] for e in live["edges"] for n in ({"id": e["source"]}, {"id": e["target"]})} <= \
        {n["id"] for n in live["nodes"]}
    assert down["source"] == "fallback" and "mermaid" not in down
    assert {"source": "ada_lovelace", "target": "charles_babbage", "relation": "appears with"} in down["edges"]
