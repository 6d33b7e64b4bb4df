"""A task context like the worker's: the real engine behind a real batcher, shared by these tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from worker.batcher import BatchStats, TokenBudgetBatcher
from worker.engine import Engine
from worker.settings import Settings
from worker.tasks import TaskContext


@pytest.fixture(scope="session")
def batch_log() -> list[BatchStats]:
    return []


@pytest.fixture(scope="session")
def ctx(settings: Settings, engine: Engine, batch_log: list[BatchStats]) -> Iterator[TaskContext]:
    # The session's model with a larger forward budget, so a test's embed tasks take one forward
    # pass (generation batches by the key/value budgets, engine.default_decode_tokens and
    # default_generate_tokens, either way).
    wide = Engine(engine.model, max_input_tokens=engine.max_input_tokens, token_budget=16384,
                  max_batch_size=32, max_new_tokens=engine.max_new_tokens)
    # A second of waiting for company lets a test's tasks, submitted together, meet in one call.
    batcher = TokenBudgetBatcher(wide, max_wait_s=1.0, on_batch=batch_log.append).start()
    try:
        yield TaskContext(settings=settings, engine=wide, batcher=batcher)
    finally:
        batcher.stop()
