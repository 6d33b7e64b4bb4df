"""Poison messages and model failures, over the runner with the real model and a real results
directory. An out-of-memory error cannot be produced on demand here, so it is injected at the
engine boundary; Pub/Sub's delivery counting is not emulated faithfully, so deliveries are fed in."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.errors import ErrorCode
from tests.reliability.figures import record
from tests.worker.test_batcher import FailingEngine, _clone
from worker.batcher import TokenBudgetBatcher
from worker.engine import Engine
from worker.runner import Delivery, Outcome, Runner
from worker.settings import Settings
from worker.store import LocalStore
from worker.tasks import TaskContext

pytestmark = [pytest.mark.reliability]


@pytest.fixture
def failing_runtime(engine: Engine, tmp_path: Path):
    failing = _clone(engine, FailingEngine)
    failing.poison = failing.tokenize(["the poisoned task"], truncate=False)[0].ids
    batcher = TokenBudgetBatcher(failing, max_wait_s=0.1).start()
    settings = Settings(device="cpu", max_attempts=3)
    store = LocalStore(tmp_path / "results")
    runner = Runner(ctx=TaskContext(settings=settings, engine=failing, batcher=batcher), store=store)
    yield runner, store
    batcher.stop()
    runner.close()


def _delivery(task_id: str, text: str, *, attempt: int | None = None, message_id: str | None = None) -> Delivery:
    body = json.dumps({"task_id": task_id, "kind": "embed", "payload": {"texts": [text]}}).encode()
    return Delivery(data=body, attributes={}, message_id=message_id, delivery_attempt=attempt)


def test_poison_task_is_retried_then_gets_a_final_error_while_its_batch_mates_succeed(failing_runtime) -> None:
    runner, store = failing_runtime
    outcomes: list[list[Outcome]] = []
    # Given a poisoned task delivered with Pub/Sub's delivery_attempt 1, 2, 3 beside healthy tasks
    for attempt in (1, 2, 3):
        futures = [runner.submit(_delivery(f"ok-{attempt}-{i}", f"healthy text {i}", attempt=attempt)) for i in range(5)]
        futures.insert(2, runner.submit(_delivery("poison", "the poisoned task", attempt=attempt)))
        outcomes.append([f.result(timeout=120) for f in futures])
    # Then the healthy ones are done every time, and the poisoned one is retried (nacked) twice and
    # then, at max_attempts=3, gets a final error result and is acked
    assert [o[2] for o in outcomes] == [Outcome.RETRY, Outcome.RETRY, Outcome.FAILED]
    assert all(o == Outcome.DONE for row in outcomes for i, o in enumerate(row) if i != 2)
    result = json.loads(store.get("adhoc/poison.json"))
    assert result["error"]["code"] == ErrorCode.TOO_MANY_DELIVERIES.value and result["attempt"] == 3
    assert "out_of_memory" in result["error"]["message"] and not result["error"]["retryable"]
    record("poison", deliveries=3, max_attempts=3, healthy_tasks=15, healthy_ok=15,
           final_code=result["error"]["code"])


def test_without_delivery_attempt_the_worker_counts_deliveries_itself(failing_runtime) -> None:
    # Given a subscription without a dead-letter policy: no delivery_attempt, only a message id
    runner, store = failing_runtime
    # When the same poisoned message is delivered three times
    outcomes = [runner.submit(_delivery("poison-2", "the poisoned task", message_id="m-1")).result(timeout=120)
                for _ in range(3)]
    # Then the worker's own count stops the retries at max_attempts
    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.FAILED]
    assert json.loads(store.get("adhoc/poison-2.json"))["error"]["code"] == "too_many_deliveries"


def test_storage_failure_is_a_retry_not_an_ack(engine: Engine, tmp_path: Path) -> None:
    # Given a results directory that cannot be created (its parent is a file)
    (tmp_path / "file").write_text("not a directory")
    batcher = TokenBudgetBatcher(engine, max_wait_s=0.01).start()
    runner = Runner(ctx=TaskContext(settings=Settings(device="cpu"), engine=engine, batcher=batcher),
                    store=LocalStore(tmp_path / "file" / "results"))
    try:
        # When a good task runs / Then its outcome is RETRY (nack): no ack without a written result
        assert runner.submit(_delivery("t-1", "hello")).result(timeout=60) == Outcome.RETRY
    finally:
        batcher.stop()
        runner.close()


def test_messages_near_and_over_the_10mb_pubsub_limit_get_error_results(engine: Engine, tmp_path: Path) -> None:
    # Given the default limit (10,000,000 bytes) and messages just under and just over it
    batcher = TokenBudgetBatcher(engine, max_wait_s=0.01).start()
    store = LocalStore(tmp_path / "results")
    runner = Runner(ctx=TaskContext(settings=Settings(device="cpu"), engine=engine, batcher=batcher), store=store)
    near = _delivery("near", "word " * 1_999_000)
    over = Delivery(data=_delivery("over", "word " * 2_001_000).data, attributes={"task_id": "over"})
    try:
        # When both run / Then each is acked with its own error result, and the worker goes on
        assert len(near.data) < 10_000_000 < len(over.data)
        assert runner.submit(near).result(timeout=120) == Outcome.FAILED
        assert runner.submit(over).result(timeout=120) == Outcome.FAILED
        assert runner.submit(_delivery("after", "a normal task")).result(timeout=60) == Outcome.DONE
    finally:
        batcher.stop()
        runner.close()
    assert json.loads(store.get("adhoc/near.json"))["error"]["code"] == ErrorCode.INPUT_TOO_LONG.value
    assert json.loads(store.get("adhoc/over.json"))["error"]["code"] == ErrorCode.MESSAGE_TOO_LARGE.value
