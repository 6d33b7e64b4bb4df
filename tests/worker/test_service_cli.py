"""`cli.py serve` as Cloud Run runs it: its own process on loopback, the model loading in the background,
the pull worker on the same runtime as the HTTP routes, and an orderly stop on SIGTERM."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli
from tests.fixtures.pipeline import json_log_records, new_topic
from tests.fixtures.services import TEST_PROJECT
from worker.client import publish_task

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    def __init__(self, *, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", *args], cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def records(self) -> list[dict]:
        return json_log_records(self.log_path)

    def stop(self, timeout: float = 20) -> tuple[int, float]:
        started = time.monotonic()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode, time.monotonic() - started


@pytest.fixture
def topic_and_subscription(pubsub_emulator) -> tuple[str, str]:
    return new_topic(TEST_PROJECT)


@pytest.fixture
def served(tmp_path: Path, topic_and_subscription: tuple[str, str]) -> Iterator[tuple[ServeProcess, str]]:
    port = _free_port()
    process = ServeProcess(args=["--host", "127.0.0.1", "--port", str(port), "--results", str(tmp_path / "results"),
                                 "--subscription", topic_and_subscription[1], "--device", "cpu",
                                 "--log-level", "INFO"], log_path=tmp_path / "serve.log")
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def _first_answer(client: httpx.Client, process: ServeProcess, path: str, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.proc.poll() is None, process.log_path.read_text()[-3000:]
        try:
            return client.get(path)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"no answer on {path} after {timeout}s: {process.log_path.read_text()[-3000:]}")


def _wait_ready(client: httpx.Client, process: ServeProcess, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert process.proc.poll() is None, process.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not ready after {timeout}s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.emulator
def test_serve_answers_at_once_shares_the_runtime_and_stops_in_order(
        served: tuple[ServeProcess, str], topic_and_subscription: tuple[str, str], tmp_path: Path) -> None:
    process, url = served
    topic, _ = topic_and_subscription
    results = tmp_path / "results" / "adhoc"
    with httpx.Client(base_url=url, timeout=120) as client:
        # Given `cli.py serve` just started with a pull subscription
        # When health is asked as soon as the port answers
        health = _first_answer(client, process, "/healthz")
        ready = client.get("/readyz")
        # Then it is live while the model loads, and not ready
        assert health.status_code == 200 and health.json()["status"] == "loading"
        assert ready.status_code == 503
        _wait_ready(client, process)

        # When one task is published (pulled) and one pushed
        pulled_id = publish_task(topic, {"kind": "embed", "payload": {"texts": ["pulled"], "dims": 4}})
        pushed = {"task_id": "pushed-1", "kind": "generate", "payload": {"prompt": "Hi", "max_tokens": 2}}
        push = client.post("/pubsub/push", json={"message": {
            "data": base64.b64encode(json.dumps(pushed).encode()).decode(), "messageId": "99"}})
        deadline = time.monotonic() + 60
        while not (results / f"{pulled_id}.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        metrics = client.get("/metrics").text
        # Then both results are written, and both went through the one runner the metrics watch
        assert push.status_code == 200 and (results / "pushed-1.json").exists()
        assert json.loads((results / f"{pulled_id}.json").read_text())["status"] == "ok"
        assert 'gemma_task_outcomes_total{outcome="done"} 2.0' in metrics

    # When Cloud Run sends SIGTERM
    code, took = process.stop()
    # Then the pull worker stops first, the app shuts down after it, and the process exits cleanly in 10 s
    records = process.records()
    assert code == 0 and took < 10, (code, took, records[-10:])
    order = [i for i, r in enumerate(records) if r.get("message") == "received SIGTERM; stopping"]
    order += [i for i, r in enumerate(records) if r.get("logger") == "worker.source" and i > order[0]][-1:]
    order += [i for i, r in enumerate(records) if r.get("message") == "Application shutdown complete."]
    assert len(order) == 3 and order == sorted(order), records[-10:]


def test_serve_refuses_options_that_cannot_work_together() -> None:
    # Given a subscription without a results location, and an account without an audience
    no_results = run_cli("serve", "--subscription", "projects/p/subscriptions/s", timeout=120)
    no_audience = run_cli("serve", "--results", "/tmp/x", "--push-service-account", "a@b.c", timeout=120)
    # Then each exits 2 with one line saying what is missing, before loading anything
    assert no_results.returncode == 2 and "--subscription needs --results" in no_results.stderr
    assert no_audience.returncode == 2 and "--push-service-account needs --push-audience" in no_audience.stderr
