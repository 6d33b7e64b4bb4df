"""Collect requests from every door into engine calls by kind and parameters, on one engine thread.

A request waits at most `max_wait_s` for company; whatever is queued when the engine frees up
joins the next call (up to `max_items` inputs), so batches grow with load. The engine then
sorts the inputs by length and splits them by token budget. If a call fails, it is split in
halves and retried, so one bad request (or an out-of-memory batch) fails alone."""
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

from schemas.errors import ErrorCode, TaskError
from worker.constrained import canonical_schema
from worker.engine import Engine, Tokenized

log = logging.getLogger(__name__)


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


class TokenBudgetBatcher:
    """The only caller of the engine in a serving process."""

    def __init__(self, engine: Engine, *, max_wait_s: float = 0.02, max_items: int = 512,
                 max_call_tokens: int | None = None, max_queued: int = 4096,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.engine = engine
        self.max_wait_s = max_wait_s
        self.max_items = max_items
        # Eight forward batches per call: inputs are sorted by length within a call only, so larger
        # calls pad less (bench/pipeline.py on 800 texts, one run each: 79% of engine-only throughput
        # at 2 batches per call, 85% and 91% at 8). About 10 s of work on 2 CPU cores, about a second
        # on a GPU; a call still running `drain_s` after SIGTERM has its tasks delivered again.
        self.max_call_tokens = max_call_tokens or 8 * engine.token_budget
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queued)
        self._on_batch = on_batch or (lambda stats: None)
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run_guarded, name="engine", daemon=True)

    def start(self) -> TokenBudgetBatcher:
        self._thread.start()
        return self

    def cancel_queued(self) -> int:
        """Refuse new requests and fail the queued ones with ShuttingDown; the call in progress goes on."""
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
        """Stop after the call in progress; requests still queued fail with ShuttingDown."""
        self._stopping.set()
        self.cancel_queued()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.cancel_queued()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit_embed(self, items: Sequence[Tokenized], *, dims: int | None, normalize: bool) -> Future:
        return self._submit("embed", items, {"dims": dims, "normalize": normalize})

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
        while not self._stopping.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            pending = self._collect(first)
            groups: dict[Hashable, list[_Request]] = {}
            for req in pending:
                groups.setdefault(req.key, []).append(req)
            for group in groups.values():
                self._run_group(group)

    def _collect(self, first: _Request) -> list[_Request]:
        pending, count, tokens = [first], len(first.items), _tokens(first)
        deadline = first.enqueued + self.max_wait_s
        while count < self.max_items and tokens < self.max_call_tokens:
            timeout = deadline - time.monotonic()
            try:
                req = self._queue.get_nowait() if timeout <= 0 else self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            pending.append(req)
            count += len(req.items)
            tokens += _tokens(req)
        return pending

    def _run_group(self, group: list[_Request]) -> None:
        live = [r for r in group if r.future.set_running_or_notify_cancel()]  # skip callers who left
        if live:
            self._call_engine(live)

    def _call_engine(self, group: list[_Request]) -> None:
        started = time.monotonic()
        items = [it for req in group for it in req.items]
        try:
            out = self._engine_call(group[0].kind, items, group[0].params)
        except Exception as exc:  # noqa: BLE001 - any failure is isolated by splitting
            if len(group) > 1:
                half = len(group) // 2
                log.warning("engine call of %d requests failed (%s); retrying in halves", len(group), exc)
                self._call_engine(group[:half])
                self._call_engine(group[half:])
                return
            group[0].future.set_exception(_as_task_error(exc))
            return
        run_ms = (time.monotonic() - started) * 1000
        self._deliver(group, out, started=started, run_ms=run_ms)
        self._on_batch(BatchStats(kind=group[0].kind, requests=len(group), inputs=len(items),
                                  tokens=sum(len(it.ids) for it in items),
                                  queue_ms=(started - min(r.enqueued for r in group)) * 1000, run_ms=run_ms))

    def _engine_call(self, kind: str, items: list[Tokenized], params: dict[str, Any]) -> Any:
        if kind == "embed":
            return self.engine.embed_tokenized(items, **params)
        return self.engine.generate_tokenized(items, **{**params, "stop": list(params["stop"])})

    @staticmethod
    def _deliver(group: list[_Request], out: Any, *, started: float, run_ms: float) -> None:
        start = 0
        for req in group:
            end = start + len(req.items)
            if hasattr(out, "vectors"):
                part = type(out)(vectors=out.vectors[start:end], input_tokens=out.input_tokens[start:end],
                                 truncated=out.truncated[start:end])
            else:
                part = out[start:end]
            req.future.set_result(Timed(value=part, queue_ms=(started - req.enqueued) * 1000, run_ms=run_ms))
            start = end


def _tokens(req: _Request) -> int:
    return sum(len(it.ids) for it in req.items)


def _as_task_error(exc: Exception) -> TaskError:
    if isinstance(exc, TaskError):
        return exc
    if "out of memory" in str(exc).lower():
        return TaskError(ErrorCode.OUT_OF_MEMORY, f"the model ran out of memory on this input: {exc}", retryable=True)
    return TaskError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", retryable=True)
