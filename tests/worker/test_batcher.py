"""The batcher over the real engine: requests from many threads share engine calls, answers
equal direct engine calls, and one failing request fails alone."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from schemas.errors import ErrorCode, TaskError
from worker.batcher import BatchStats, ShuttingDown, TokenBudgetBatcher
from worker.engine import Engine, plan_batches


class FailingEngine(Engine):
    """Injects an out-of-memory error at the engine boundary whenever a poisoned input is in the call:
    a fault this machine cannot produce for real."""

    poison: tuple[int, ...] = ()

    def embed_pass(self, rows):
        if any(tuple(r) == self.poison for r in rows):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().embed_pass(rows)


@pytest.fixture
def batches() -> list[BatchStats]:
    return []


def _clone(engine: Engine, cls: type[Engine] = Engine) -> Engine:
    return cls(engine.model, max_input_tokens=engine.max_input_tokens, token_budget=engine.token_budget,
               max_batch_size=engine.max_batch_size, max_new_tokens=engine.max_new_tokens)


def _outcomes(batcher: TokenBudgetBatcher, futures: list) -> list:
    """Each future's value, or the TaskError it failed with; the batcher is stopped after."""
    outcomes = []
    try:
        for f in futures:
            try:
                outcomes.append(f.result(timeout=120).value)
            except TaskError as exc:
                outcomes.append(exc)
    finally:
        batcher.stop()
    return outcomes


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
    outcomes = _outcomes(batcher.start(), futures)
    # Then the call was halved until the culprit ran alone: it fails as a retryable out_of_memory,
    # and the seven others succeed
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, TaskError)]
    assert failed == [5]
    assert outcomes[5].code == ErrorCode.OUT_OF_MEMORY and outcomes[5].retryable
    assert sum(b.requests for b in batches) == 7


class FailingGenerateEngine(Engine):
    """Fails any generate call that holds the poisoned prompt, as a shared call with one input the
    model cannot take would (a fault this machine cannot produce on demand)."""

    poison: tuple[int, ...] = ()

    def generate_tokenized(self, items, **params):
        if any(tuple(it.ids) == self.poison for it in items):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return super().generate_tokenized(items, **params)


GREEDY = {"temperature": 0.0, "top_p": 1.0, "stop": (), "seed": None}


def test_generate_requests_share_calls_by_parameters_within_the_call_limits(
        engine: Engine, batches: list[BatchStats]) -> None:
    # Given seven one-prompt greedy requests queued before the engine thread starts: five for 3 new
    # tokens, two for 2, with calls capped at 3 inputs, and one 3-token request far over the
    # call's prompt-token cap
    prompts = [f"Item {i} on the list is" for i in range(6)]
    items = [engine.tokenize([p], truncate=False) for p in prompts]
    long_item = engine.tokenize(["word " * 60], truncate=False)
    cap = 3 * len(items[0][0].ids)
    batcher = TokenBudgetBatcher(engine, max_wait_s=0.2, max_items=3, max_call_tokens=cap, on_batch=batches.append)
    futures = [batcher.submit_generate(it, max_new_tokens=3 if i < 4 else 2, **GREEDY) for i, it in enumerate(items)]
    futures.append(batcher.submit_generate(long_item, max_new_tokens=3, **GREEDY))
    batcher.start()
    try:
        answers = [f.result(timeout=120).value for f in futures]
    finally:
        batcher.stop()
    # Then one call per parameter group and limit: the 3-token prompts in calls of 3 and 1 (the
    # long one alone, past the token cap), the 2-token ones together
    calls = sorted((b.inputs, b.tokens) for b in batches if b.kind == "generate")
    assert [n for n, _ in calls] == [1, 1, 2, 3] and all(t <= cap for n, t in calls if n > 1)
    assert sum(b.requests for b in batches) == 7
    # And each request got its own answer, the one a direct call gives
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        direct = engine.generate([prompt], max_new_tokens=3 if i < 4 else 2)[0]
        assert len(answer) == 1 and answer[0].token_ids == direct.token_ids
    assert answers[-1][0].token_ids == engine.generate_tokenized(long_item, max_new_tokens=3)[0].token_ids


def test_a_failing_generate_call_is_halved_until_only_the_culprit_fails(
        engine: Engine, batches: list[BatchStats]) -> None:
    # Given an engine whose generate fails whenever one particular prompt is in the call
    failing = _clone(engine, FailingGenerateEngine)
    items = [failing.tokenize([f"Item {i} on the list is"], truncate=False) for i in range(6)]
    failing.poison = tuple(items[4][0].ids)
    batcher = TokenBudgetBatcher(failing, max_wait_s=0.2, on_batch=batches.append)
    # When all six share one call
    futures = [batcher.submit_generate(it, max_new_tokens=2, **GREEDY) for it in items]
    outcomes = _outcomes(batcher.start(), futures)
    # Then only the culprit fails (retryable: the cause is unknown), and the other five got answers
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, TaskError)]
    assert failed == [4] and outcomes[4].retryable and outcomes[4].code == ErrorCode.INTERNAL
    assert sum(b.requests for b in batches) == 5 and all(len(o) == 1 for o in outcomes if isinstance(o, list))


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


class RecordingEngine(Engine):
    """The real engine, noting the token-id rows of every forward pass; `hold` (when set) keeps the
    first pass waiting until released, so a test can act while the engine is busy."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[list[tuple[int, ...]]] = []
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def embed_pass(self, rows):
        self.passes.append([tuple(r) for r in rows])
        self.entered.set()
        if self.hold is not None and len(self.passes) == 1:
            self.hold.wait(60)
        return super().embed_pass(rows)


def _recording(engine: Engine, *, token_budget: int, max_batch_size: int) -> RecordingEngine:
    return RecordingEngine(engine.model, max_input_tokens=engine.max_input_tokens, token_budget=token_budget,
                           max_batch_size=max_batch_size, max_new_tokens=engine.max_new_tokens)


def _mixed(engine: Engine, docstrings: list[str], count: int) -> list[str]:
    """`count` texts alternating short and long, so a request's own inputs are far apart in length."""
    ranked = sorted(docstrings[:200], key=lambda t: len(engine.tokenize([t], truncate=True)[0].ids))
    shorts = [t for t in ranked if 8 <= len(engine.tokenize([t], truncate=True)[0].ids) <= 24]
    longs = [t for t in ranked if 60 <= len(engine.tokenize([t], truncate=True)[0].ids) <= 120]
    return [(shorts if k % 2 == 0 else longs)[k // 2] for k in range(count)]


def test_inputs_of_different_requests_share_passes_by_length(engine: Engine, docstrings: list[str]) -> None:
    # Given 6 requests of 4 texts each, every request mixing short and long texts, queued before
    # the engine thread starts, and a budget that needs several passes
    recording = _recording(engine, token_budget=512, max_batch_size=16)
    texts = _mixed(engine, docstrings, 24)
    requests = [recording.tokenize(texts[k: k + 4], truncate=True) for k in range(0, 24, 4)]
    batcher = TokenBudgetBatcher(recording, max_wait_s=0.2)
    futures = [batcher.submit_embed(items, dims=None, normalize=True) for items in requests]
    batcher.start()
    try:
        answers = [f.result(timeout=300).value for f in futures]
    finally:
        batcher.stop()
    # Then passes were planned over the pool: each pass mixes requests, and padding is less than
    # planning every request alone would give (the old per-call rule with one request per call)
    owner = {it.ids: r for r, items in enumerate(requests) for it in items}
    assert all(len({owner[row] for row in rows}) > 1 for rows in recording.passes)
    padded = sum(max(map(len, rows)) * len(rows) for rows in recording.passes)
    alone = sum(max(len(items[i].ids) for i in b) * len(b) for items in requests
                for b in plan_batches([len(it.ids) for it in items], token_budget=512, max_batch_size=16))
    assert padded < alone
    # And every request got its own texts' vectors, in its order
    direct = engine.embed(texts, truncate=True).vectors
    got = np.concatenate([a.vectors for a in answers])
    assert np.sum(got * direct, axis=1).min() >= 0.9999
    assert [a.input_tokens for a in answers] == [[len(it.ids) for it in items] for items in requests]


def test_a_request_is_answered_when_its_last_input_is_done(engine: Engine, docstrings: list[str]) -> None:
    # Given a one-text request queued before a 40-text request, with room for 8 texts per pass
    recording = _recording(engine, token_budget=4096, max_batch_size=8)
    small = recording.tokenize(docstrings[:1], truncate=True)
    large = recording.tokenize(docstrings[1:41], truncate=True)
    batcher = TokenBudgetBatcher(recording, max_wait_s=0.2)
    order: list[str] = []
    first = batcher.submit_embed(small, dims=None, normalize=True)
    second = batcher.submit_embed(large, dims=16, normalize=False)
    first.add_done_callback(lambda f: order.append("small"))
    second.add_done_callback(lambda f: order.append("large"))
    batcher.start()
    try:
        small_vectors, large_vectors = first.result(timeout=300).value, second.result(timeout=300).value
    finally:
        batcher.stop()
    # Then the small request was answered after its own pass, not after the whole pool
    assert order == ["small", "large"] and len(recording.passes) >= 5
    # And each got its own parameters: full width normalised, 16 dimensions raw
    assert small_vectors.vectors.shape == (1, engine.width)
    assert np.isclose(np.linalg.norm(small_vectors.vectors[0]), 1.0, atol=1e-5)
    assert large_vectors.vectors.shape == (40, 16)
    raw = engine.embed(docstrings[1:41], dims=16, normalize=False, truncate=True).vectors
    assert np.allclose(large_vectors.vectors, raw, rtol=1e-3, atol=1e-4)


def test_shutdown_serves_admitted_requests_and_hands_back_queued_ones(engine: Engine, docstrings: list[str]) -> None:
    # Given a batcher whose first forward pass is held while 3 requests wait in its pool
    recording = _recording(engine, token_budget=4096, max_batch_size=4)
    recording.hold = threading.Event()
    batcher = TokenBudgetBatcher(recording, max_wait_s=0.2)
    admitted = [batcher.submit_embed(recording.tokenize(docstrings[k: k + 4], truncate=True), dims=None, normalize=True)
                for k in (0, 4, 8)]
    batcher.start()
    assert recording.entered.wait(120)
    late = batcher.submit_embed(recording.tokenize(docstrings[12:13], truncate=True), dims=None, normalize=True)
    # When shutdown begins (queued requests refused) and the pass is released
    assert batcher.cancel_queued() == 1
    with pytest.raises(ShuttingDown):
        batcher.submit_embed(recording.tokenize(["too late"], truncate=True), dims=None, normalize=True)
    recording.hold.set()
    try:
        results = [f.result(timeout=300).value for f in admitted]
    finally:
        batcher.stop()
    # Then the admitted requests are all answered, and the queued one is handed back for redelivery
    assert [r.vectors.shape[0] for r in results] == [4, 4, 4]
    assert isinstance(late.exception(timeout=5), ShuttingDown)


def test_stop_fails_pooled_requests_with_shutting_down(engine: Engine, docstrings: list[str]) -> None:
    # Given one-text requests, one per pass, the first pass held while the others wait in the pool
    recording = _recording(engine, token_budget=4096, max_batch_size=1)
    recording.hold = threading.Event()
    batcher = TokenBudgetBatcher(recording, max_wait_s=0.2)
    futures = [batcher.submit_embed(recording.tokenize([docstrings[k]], truncate=True), dims=None, normalize=True)
               for k in range(3)]
    batcher.start()
    assert recording.entered.wait(120)
    # When the batcher is stopped during that pass
    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout": 120})
    stopper.start()
    time.sleep(0.2)
    recording.hold.set()
    stopper.join(150)
    # Then the pass in progress completes its request, and the others are handed back, not lost
    assert futures[0].result(timeout=5).value.vectors.shape[0] == 1
    assert all(isinstance(f.exception(timeout=5), ShuttingDown) for f in futures[1:])
    assert len(recording.passes) == 1
