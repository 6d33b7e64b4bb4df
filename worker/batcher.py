"""Collect requests from every door and run them on one engine thread.

Embedding inputs wait in a pool across requests: forward passes are planned over the pool's
oldest inputs (up to `pool_tokens`), sorted by length and split by token budget (`plan_batches`,
remade every REPLAN_EVERY passes), and the pass that runs is the planned batch holding an input
of the oldest request. So inputs of
similar length from different requests share a pass, nothing waits behind younger work, and a
request is answered as soon as its last input is done.

Generation requests are grouped into engine calls by parameters, as many as are queued when the
engine frees up (a request waits at most `max_wait_s` for company), up to `max_items` inputs.

A failing forward pass or call is split in halves and retried, so one bad input (or an
out-of-memory batch) fails its own request alone."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.errors import ErrorCode, TaskError
from worker.constrained import canonical_schema
from worker.engine import Engine, Tokenized, plan_batches

log = logging.getLogger(__name__)

REPLAN_EVERY = 8  # embedding passes between two plans of the pool


@dataclass(frozen=True)
class BatchStats:
    """What one engine call did, for logs, metrics and tests."""

    kind: str
    requests: int
    inputs: int
    tokens: int
    queue_ms: float
    run_ms: float


class ShuttingDown(TaskError):
    """The worker stopped before this request reached the engine: deliver it again, it did not fail."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.MODEL_UNAVAILABLE, "worker is shutting down; the task will be delivered again",
                         retryable=True)


@dataclass(frozen=True)
class Timed:
    """An engine answer for one request, with how long it queued and how long its call ran."""

    value: Any
    queue_ms: float
    run_ms: float


@dataclass
class _Request:
    kind: str
    key: Hashable
    items: Sequence[Tokenized]
    params: dict[str, Any]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class _Pooled:
    """An embed request in the pool: its vectors so far and the inputs still to run."""

    req: _Request
    raw: np.ndarray
    todo: set[int]
    first_pass: float | None = None


class TokenBudgetBatcher:
    """The only caller of the engine in a serving process."""

    def __init__(self, engine: Engine, *, max_wait_s: float = 0.02, max_items: int = 512,
                 max_call_tokens: int | None = None, pool_tokens: int | None = None,
                 pool_items: int | None = None, max_queued: int = 4096,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.engine = engine
        self.max_wait_s = max_wait_s
        self.max_items = max_items
        # Generation calls: up to eight forward budgets of prompt tokens per call.
        self.max_call_tokens = max_call_tokens or 8 * engine.token_budget
        # Embedding: passes are planned over the pool's oldest inputs, up to 32 token budgets
        # and 16 full batches of them. Planning over more inputs pads less (a replay of the 2,000
        # bench texts in 16-text tasks: 91% real tokens when each 8-budget call was planned
        # alone, 97% over a 32-budget window, 99% over all at once); a plan over ~1,000 inputs
        # takes 1-5 ms, made every REPLAN_EVERY passes.
        self.pool_tokens = pool_tokens or 32 * engine.token_budget
        self.pool_items = pool_items or 16 * engine.max_batch_size
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queued)
        self._pool: list[_Pooled] = []  # embed requests admitted, oldest first; engine thread only
        self._calls: list[_Request] = []  # generate requests admitted, oldest first; engine thread only
        self._plan: list[list[tuple[_Pooled, int]]] = []  # forward batches planned over the pool, not yet run
        self._plan_age = 0  # passes run since the plan was made
        self._on_batch = on_batch or (lambda stats: None)
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run_guarded, name="engine", daemon=True)

    def start(self) -> TokenBudgetBatcher:
        self._thread.start()
        return self

    def cancel_queued(self) -> int:
        """Refuse new requests and fail the queued ones with ShuttingDown (their tasks are delivered
        again). Requests already admitted (in the embedding pool, or in the call in progress) go on
        being served until `stop`."""
        self._closed.set()
        cancelled = 0
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return cancelled
            req.future.set_exception(ShuttingDown())
            cancelled += 1

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the pass or call in progress; requests not done fail with ShuttingDown."""
        self._stopping.set()
        self.cancel_queued()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.cancel_queued()

    @property
    def depth(self) -> int:
        """Requests waiting: queued, or admitted and not yet answered."""
        return self._queue.qsize() + len(self._pool) + len(self._calls)

    def submit_embed(self, items: Sequence[Tokenized], *, dims: int | None, normalize: bool) -> Future:
        return self._submit("embed", items, {"dims": self.engine.check_dims(dims), "normalize": normalize})

    def submit_generate(self, items: Sequence[Tokenized], *, max_new_tokens: int, temperature: float,
                        top_p: float, stop: Sequence[str], seed: int | None,
                        response_schema: Mapping[str, Any] | str | None = None) -> Future:
        # The schema travels as canonical JSON: hashable for the grouping key, and equal schemas
        # from different requests share one call (and one compiled grammar).
        schema = None if response_schema is None else canonical_schema(response_schema)
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                  "stop": tuple(stop), "seed": seed, "response_schema": schema}
        return self._submit("generate", items, params)

    def _submit(self, kind: str, items: Sequence[Tokenized], params: dict[str, Any]) -> Future:
        if self._closed.is_set():
            raise ShuttingDown()
        key = (kind, tuple(sorted(params.items())))
        req = _Request(kind=kind, key=key, items=items, params=params)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise TaskError(ErrorCode.MODEL_UNAVAILABLE,
                            f"engine queue is full (max_queued={self._queue.maxsize}); retry later", retryable=True) from None
        return req.future

    # ---- engine thread -----------------------------------------------------------------
    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:  # a dead engine thread must not leave a live-looking process
            log.critical("engine thread died; exiting so the platform restarts the process", exc_info=True)
            logging.shutdown()
            os._exit(70)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._admit():
                    continue
                if self._calls:
                    self._run_calls()
                if self._pool and not self._stopping.is_set():
                    self._embed_pass()
        finally:
            self._fail_admitted()

    def _admit(self) -> bool:
        """Move queued requests into the pool and the call list. When nothing is admitted, wait
        (briefly) for a first request and then up to `max_wait_s` for company. True when there is work."""
        inputs = sum(len(p.todo) for p in self._pool)
        tokens = sum(len(p.req.items[i].ids) for p in self._pool for i in p.todo)
        if not self._pool and not self._calls:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                return False
            self._take(first)
            inputs, tokens = inputs + len(first.items), tokens + _tokens(first)
            deadline = first.enqueued + self.max_wait_s
        else:
            deadline = 0.0  # only what is queued now
        # Admitted work is capped (the rest waits in the queue, where a shutdown hands it back).
        while inputs < max(self.pool_items, self.max_items) and tokens < max(self.pool_tokens, self.max_call_tokens):
            timeout = deadline - time.monotonic()
            try:
                req = self._queue.get_nowait() if timeout <= 0 else self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            self._take(req)
            inputs, tokens = inputs + len(req.items), tokens + _tokens(req)
        return bool(self._pool or self._calls)

    def _take(self, req: _Request) -> None:
        if not req.future.set_running_or_notify_cancel():  # the caller left
            return
        if req.kind == "embed":
            raw = np.empty((len(req.items), self.engine.width), dtype=np.float32)
            self._pool.append(_Pooled(req=req, raw=raw, todo=set(range(len(req.items)))))
        else:
            self._calls.append(req)

    def _fail_admitted(self) -> None:
        for p in self._pool:
            p.req.future.set_exception(ShuttingDown())
        for r in self._calls:
            r.future.set_exception(ShuttingDown())
        self._pool.clear()
        self._calls.clear()
        self._plan.clear()

    # ---- embedding: one forward pass over the pool ------------------------------------
    def _embed_pass(self) -> None:
        """Run the planned batch holding an input of the oldest request. The plan is remade every
        `REPLAN_EVERY` passes (or when it no longer holds the oldest request), so planning costs a
        fraction of a pass even where passes are short (a GPU); in a replay of the bench texts,
        planning every pass or every eighth gave the same fill within 0.3 point."""
        oldest = self._pool[0]
        plan = [[(p, i) for p, i in batch if i in p.todo] for batch in self._plan]  # drop done/failed inputs
        self._plan = [batch for batch in plan if batch]
        if self._plan_age >= REPLAN_EVERY or not any(p is oldest for batch in self._plan for p, _ in batch):
            self._plan, self._plan_age = self._make_plan(), 0
        chosen = next(batch for batch in self._plan if any(p is oldest for p, _ in batch))
        self._plan.remove(chosen)
        self._plan_age += 1
        self._run_pass(chosen)
        done = [p for p in self._pool if not p.todo]
        self._pool = [p for p in self._pool if p.todo]
        for p in done:
            self._answer(p)

    def _make_plan(self) -> list[list[tuple[_Pooled, int]]]:
        """Forward batches over the pool's oldest inputs, up to `pool_tokens` and `pool_items`."""
        window: list[tuple[_Pooled, int]] = []  # (request, input index), oldest requests first
        tokens = 0
        for p in self._pool:
            for i in sorted(p.todo):
                window.append((p, i))
                tokens += len(p.req.items[i].ids)
                if tokens >= self.pool_tokens or len(window) >= self.pool_items:
                    break
            else:
                continue
            break
        plan = plan_batches([len(p.req.items[i].ids) for p, i in window], token_budget=self.engine.token_budget,
                            max_batch_size=self.engine.max_batch_size)
        return [[window[k] for k in batch] for batch in plan]

    def _run_pass(self, inputs: list[tuple[_Pooled, int]]) -> None:
        """One forward pass; on failure, halves until the failing input runs alone and fails its request."""
        inputs = [(p, i) for p, i in inputs if not p.req.future.done()]  # a request that failed meanwhile
        if not inputs:
            return
        started = time.monotonic()
        try:
            raw = self.engine.embed_pass([p.req.items[i].ids for p, i in inputs])
        except Exception as exc:  # noqa: BLE001 - any failure is isolated by splitting
            _halve_or_fail(inputs, exc, retry=self._run_pass, fail=_fail_pooled, what="forward pass", unit="inputs")
            return
        for (p, i), vector in zip(inputs, raw):
            p.raw[i] = vector
            p.todo.discard(i)
            if p.first_pass is None:
                p.first_pass = started
        requests = {id(p): p for p, _ in inputs}.values()
        self._on_batch(BatchStats(kind="embed", requests=len(requests), inputs=len(inputs),
                                  tokens=sum(len(p.req.items[i].ids) for p, i in inputs),
                                  queue_ms=(started - min(p.req.enqueued for p in requests)) * 1000,
                                  run_ms=(time.monotonic() - started) * 1000))

    def _answer(self, p: _Pooled) -> None:
        if p.req.future.done():  # failed in a pass
            return
        try:
            value = self.engine.finish_embeddings(p.raw, p.req.items, **p.req.params)
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine thread goes on
            p.req.future.set_exception(_as_task_error(exc))
            return
        now = time.monotonic()
        first = p.first_pass if p.first_pass is not None else now
        p.req.future.set_result(Timed(value=value, queue_ms=(first - p.req.enqueued) * 1000,
                                      run_ms=(now - first) * 1000))

    # ---- generation: whole calls by parameters -----------------------------------------
    def _run_calls(self) -> None:
        """The generate requests admitted, grouped by parameters, one engine call per group (oldest
        group first), each call up to `max_items` inputs and `max_call_tokens` prompt tokens."""
        calls, self._calls = self._calls, []
        groups: dict[Hashable, list[_Request]] = {}
        for req in calls:
            groups.setdefault(req.key, []).append(req)
        for group in groups.values():
            call: list[_Request] = []
            for req in group:
                if call and (sum(len(r.items) for r in call) + len(req.items) > self.max_items
                             or sum(_tokens(r) for r in call) + _tokens(req) > self.max_call_tokens):
                    self._call_engine(call)
                    call = []
                call.append(req)
            self._call_engine(call)

    def _call_engine(self, group: list[_Request]) -> None:
        started = time.monotonic()
        items = [it for req in group for it in req.items]
        try:
            out = self.engine.generate_tokenized(items, **{**group[0].params, "stop": list(group[0].params["stop"])})
        except Exception as exc:  # noqa: BLE001 - any failure is isolated by splitting
            _halve_or_fail(group, exc, retry=self._call_engine, fail=lambda req, error: req.future.set_exception(error),
                           what="engine call", unit="requests")
            return
        run_ms = (time.monotonic() - started) * 1000
        start = 0
        for req in group:
            end = start + len(req.items)
            req.future.set_result(Timed(value=out[start:end], queue_ms=(started - req.enqueued) * 1000, run_ms=run_ms))
            start = end
        self._on_batch(BatchStats(kind=group[0].kind, requests=len(group), inputs=len(items),
                                  tokens=sum(len(it.ids) for it in items),
                                  queue_ms=(started - min(r.enqueued for r in group)) * 1000, run_ms=run_ms))


def _halve_or_fail(items: list[Any], exc: Exception, *, retry: Callable[[list[Any]], None],
                   fail: Callable[[Any, TaskError], None], what: str, unit: str) -> None:
    """After `items` failed together: `retry` each half, so one bad input fails alone and the rest
    go on; a single item that failed gets the error."""
    if len(items) > 1:
        half = len(items) // 2
        log.warning("%s of %d %s failed (%s); retrying in halves", what, len(items), unit, exc)
        retry(items[:half])
        retry(items[half:])
        return
    fail(items[0], _as_task_error(exc))


def _fail_pooled(item: tuple[_Pooled, int], error: TaskError) -> None:
    pooled = item[0]
    pooled.req.future.set_exception(error)
    pooled.todo.clear()  # its other inputs are not needed; it leaves the pool


def _tokens(req: _Request) -> int:
    return sum(len(it.ids) for it in req.items)


def _as_task_error(exc: Exception) -> TaskError:
    if isinstance(exc, TaskError):
        return exc
    if "out of memory" in str(exc).lower():
        return TaskError(ErrorCode.OUT_OF_MEMORY, f"the model ran out of memory on this input: {exc}", retryable=True)
    return TaskError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", retryable=True)
