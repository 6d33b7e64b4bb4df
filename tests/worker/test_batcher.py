"""The batcher over the real engine: requests from many threads share engine calls, answers
equal direct engine calls, and one failing request fails alone."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from schemas.errors import ErrorCode, TaskError
from worker.batcher import BatchStats, TokenBudgetBatcher
from worker.engine import Engine


class FailingEngine(Engine):
    """Injects an out-of-memory error at the engine boundary whenever a poisoned input is in the call:
    a fault this machine cannot produce for real."""

    poison: tuple[int, ...] = ()

    def embed_tokenized(self, items, **kwargs):
        if any(it.ids == self.poison for it in items):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().embed_tokenized(items, **kwargs)


@pytest.fixture
def batches() -> list[BatchStats]:
    return []


def _clone(engine: Engine, cls: type[Engine] = Engine) -> Engine:
    return cls(engine.model, max_input_tokens=engine.max_input_tokens, token_budget=engine.token_budget,
               max_batch_size=engine.max_batch_size, max_new_tokens=engine.max_new_tokens)


def test_concurrent_requests_share_engine_calls_and_get_their_own_answers(
        engine: Engine, docstrings: list[str], batches: list[BatchStats]) -> None:
    # Given a batcher and 24 requests submitted from 8 threads at once
    batcher = TokenBudgetBatcher(engine, max_wait_s=0.05, on_batch=batches.append).start()
    texts = docstrings[:24]
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = list(pool.map(
                lambda t: batcher.submit_embed(engine.tokenize([t], truncate=False), dims=None, normalize=True), texts))
            answers = [f.result(timeout=120).value.vectors[0] for f in futures]
    finally:
        batcher.stop()
    # Then engine calls carried several requests, and each answer is that text's own vector
    assert sum(b.requests for b in batches) == 24 and max(b.requests for b in batches) > 1
    direct = engine.embed(texts).vectors
    assert np.sum(np.stack(answers) * direct, axis=1).min() >= 0.9999


def test_out_of_memory_splits_the_call_and_only_the_culprit_fails(engine: Engine, batches: list[BatchStats]) -> None:
    # Given an engine that runs out of memory whenever one particular input is in the call
    failing = _clone(engine, FailingEngine)
    texts = [f"sentence number {i} about graphs" for i in range(8)]
    items = [failing.tokenize([t], truncate=False) for t in texts]
    failing.poison = items[5][0].ids
    batcher = TokenBudgetBatcher(failing, max_wait_s=0.2, on_batch=batches.append)
    # When all eight are queued before the engine thread starts, so they share one call
    futures = [batcher.submit_embed(it, dims=None, normalize=True) for it in items]
    batcher.start()
    try:
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=120).value)
            except TaskError as exc:
                outcomes.append(exc)
    finally:
        batcher.stop()
    # Then the call was halved until the culprit ran alone: it fails as a retryable out_of_memory,
    # and the seven others succeed
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, TaskError)]
    assert failed == [5]
    assert outcomes[5].code == ErrorCode.OUT_OF_MEMORY and outcomes[5].retryable
    assert sum(b.requests for b in batches) == 7


def test_full_queue_refuses_with_a_retryable_error(engine: Engine) -> None:
    # Given a batcher whose queue holds one request and whose engine thread is not running
    batcher = TokenBudgetBatcher(engine, max_queued=1)
    items = engine.tokenize(["one"], truncate=False)
    batcher.submit_embed(items, dims=None, normalize=True)
    # When a second request arrives / Then it is refused, naming the limit
    with pytest.raises(TaskError) as caught:
        batcher.submit_embed(items, dims=None, normalize=True)
    assert caught.value.retryable and "max_queued=1" in caught.value.message
    batcher.stop(timeout=0.1)
