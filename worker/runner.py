"""One task's whole life, the same for every door: decode → already done? → within this worker's
limits, and cached? → engine (via the batcher) → result → create-only write (then its cache
entry) → outcome. The door turns the outcome into ack/nack or an HTTP status, and only after this
returns, so "write, then acknowledge" lives here alone."""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from schemas.codec import DecodeError, decode_envelope
from schemas.errors import ErrorCode, ErrorInfo, TaskError
from schemas.result import Result, ResultStatus, Timings
from worker.batcher import ShuttingDown, Timed
from worker.cache import CacheEntry, ResultCache, engine_facts
from worker.store import Store
from worker.tasks import TaskContext, check_task, start_task

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    DONE = "done"  # result written by us
    DUPLICATE = "duplicate"  # a result already existed: the task was done before
    FAILED = "failed"  # an error result written: the task can never succeed
    REJECTED = "rejected"  # unreadable and without a task id: recorded under _rejected/
    RETRY = "retry"  # nothing durable happened; deliver again

    @property
    def ack(self) -> bool:
        return self is not Outcome.RETRY


@dataclass(frozen=True)
class Delivery:
    """One message as any door received it."""

    data: bytes
    attributes: Mapping[str, str]
    message_id: str | None = None
    delivery_attempt: int | None = None  # from Pub/Sub when the subscription has a dead-letter policy


def result_name(batch_id: str | None, task_id: str) -> str:
    """Where a task's result lives under the results prefix: a pure function of the envelope."""
    return f"{batch_id or 'adhoc'}/{task_id}.json"


def _safe_message_id(message_id: str | None) -> str | None:
    """Pub/Sub message ids are digits; anything else is made safe for an object name."""
    if not message_id:
        return None
    return re.sub(r"[^A-Za-z0-9_-]", "_", message_id)[:128]


class Runner:
    def __init__(self, *, ctx: TaskContext, store: Store,
                 on_outcome: Callable[[Outcome, Result | None], None] | None = None,
                 on_cache: Callable[[str, bool], None] | None = None) -> None:
        self.ctx = ctx
        self.store = store
        self.model_name = ctx.engine.name
        self.cache = (ResultCache(store, model_name=self.model_name, facts=engine_facts(ctx.engine))
                      if ctx.settings.result_cache else None)
        self._io = ThreadPoolExecutor(max_workers=ctx.settings.io_workers, thread_name_prefix="io")
        self._on_outcome = on_outcome or (lambda outcome, result: None)
        self._on_cache = on_cache or (lambda kind, hit: None)  # (kind, hit?) for every lookup made
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._attempts_lock = threading.Lock()

    def submit(self, delivery: Delivery) -> Future:
        """Start a delivery's life; the future resolves to its Outcome and never raises."""
        done: Future = Future()
        self._io.submit(self._guard, done, self._begin, delivery, done)
        return done

    def cancel_queued(self) -> int:
        """For shutdown: tasks not yet in an engine call settle at once as RETRY (so they are nacked)."""
        return self.ctx.batcher.cancel_queued()

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=False)

    # ---- stages ------------------------------------------------------------------------
    def _begin(self, delivery: Delivery, done: Future) -> None:
        started = time.monotonic()
        attempt = self._attempt(delivery)
        try:
            task = decode_envelope(delivery.data, delivery.attributes, max_bytes=self.ctx.settings.max_message_bytes)
        except DecodeError as exc:
            done.set_result(self._record_undecodable(exc, delivery, attempt))
            return
        name = result_name(task.batch_id, task.task_id)
        try:
            if self.store.exists(name):
                done.set_result(self._settled(Outcome.DUPLICATE, None, task.task_id))
                return
        except TaskError as exc:
            log.warning("could not check for an earlier result, will retry: %s", exc.message,
                        extra={"task_id": task.task_id})
            done.set_result(self._settled(Outcome.RETRY, None, task.task_id))
            return
        key = self.cache.key_for(task) if self.cache is not None else None
        if key is not None:
            try:  # this worker's own limits first: another worker's entry may answer what it would refuse
                check_task(task, self.ctx)
            except TaskError as exc:
                done.set_result(self._write(name, self._error_result(task, exc, attempt, started)))
                return
            if (entry := self._lookup(task, key)) is not None:
                done.set_result(self._write(name, self._cached_result(task, entry, attempt, started)))
                return
        try:
            running = start_task(task, self.ctx)
        except ShuttingDown:
            done.set_result(self._settled(Outcome.RETRY, None, task.task_id))
            return
        except TaskError as exc:
            done.set_result(self._write(name, self._error_result(task, exc, attempt, started)))
            return
        running.future.add_done_callback(lambda fut: self._io.submit(
            self._guard, done, self._finish, task, running, fut, attempt, started, done, key))

    def _finish(self, task: Any, running: Any, fut: Future, attempt: int, started: float, done: Future,
                key: str | None) -> None:
        name = result_name(task.batch_id, task.task_id)
        try:
            timed: Timed = fut.result()
            output = running.finish(timed.value)
        except ShuttingDown:
            done.set_result(self._settled(Outcome.RETRY, None, task.task_id))
            return
        except TaskError as exc:
            if exc.retryable and attempt < self.ctx.settings.max_attempts:
                log.warning("task failed, will retry: %s", exc.message, extra={"task_id": task.task_id})
                done.set_result(self._settled(Outcome.RETRY, None, task.task_id))
                return
            if exc.retryable:
                # A poison message: it failed on every delivery, so stop retrying and say why.
                exc = TaskError(ErrorCode.TOO_MANY_DELIVERIES, (
                    f"failed on {attempt} deliveries (max_attempts={self.ctx.settings.max_attempts}); "
                    f"last error: [{exc.code.value}] {exc.message}"), retryable=False)
            done.set_result(self._write(name, self._error_result(task, exc, attempt, started)))
            return
        timings = Timings(queue_ms=round(timed.queue_ms, 2), inference_ms=round(timed.run_ms, 2),
                          total_ms=round((time.monotonic() - started) * 1000, 2))
        result = Result(task_id=task.task_id, custom_id=task.custom_id, batch_id=task.batch_id, kind=task.kind,
                        status=ResultStatus.OK, output=output, model=self.model_name, timings=timings, attempt=attempt)
        outcome = self._write(name, result)
        if outcome is Outcome.DONE and key is not None:
            # Before the outcome is handed back, so a task acknowledged is a task the next twin finds.
            self.cache.put(key, result)
        done.set_result(outcome)

    def _lookup(self, task: Any, key: str) -> CacheEntry | None:
        entry = self.cache.get(key, task_id=task.task_id)
        self._on_cache(task.kind, entry is not None)
        return entry

    def _cached_result(self, task: Any, entry: CacheEntry, attempt: int, started: float) -> Result:
        """The task's own result (its ids, its attempt) carrying an earlier identical task's output."""
        return Result(task_id=task.task_id, custom_id=task.custom_id, batch_id=task.batch_id, kind=task.kind,
                      status=ResultStatus.OK, output=entry.output, model=entry.model, attempt=attempt, cached=True,
                      timings=Timings(total_ms=round((time.monotonic() - started) * 1000, 2)))

    def _write(self, name: str, result: Result) -> Outcome:
        """Create-only write; an object already there means another delivery finished first."""
        try:
            created = self.store.put_if_absent(name, result.model_dump_json().encode())
        except TaskError as exc:
            log.warning("result write failed, will retry: %s", exc.message, extra={"task_id": result.task_id})
            return self._settled(Outcome.RETRY, None, result.task_id)
        if not created:
            return self._settled(Outcome.DUPLICATE, None, result.task_id)
        return self._settled(Outcome.DONE if result.status is ResultStatus.OK else Outcome.FAILED, result, result.task_id)

    def _record_undecodable(self, exc: DecodeError, delivery: Delivery, attempt: int) -> Outcome:
        if exc.task_id is None:
            # No task id means no result location; keep a record so nothing vanishes unseen.
            log.warning("rejected message %s: %s", delivery.message_id, exc.message)
            record_id = _safe_message_id(delivery.message_id)
            if record_id:
                body = ErrorInfo(code=exc.code, message=exc.message).model_dump_json().encode()
                try:
                    self.store.put_if_absent(f"_rejected/{record_id}.json", body)
                except TaskError:
                    return self._settled(Outcome.RETRY, None, None)
            return self._settled(Outcome.REJECTED, None, None)
        result = Result(task_id=exc.task_id, custom_id=exc.custom_id, batch_id=exc.batch_id, kind=exc.kind,
                        status=ResultStatus.ERROR, error=exc.to_info(), model=self.model_name, attempt=attempt)
        return self._write(result_name(exc.batch_id, exc.task_id), result)

    def _error_result(self, task: Any, exc: TaskError, attempt: int, started: float) -> Result:
        return Result(task_id=task.task_id, custom_id=task.custom_id, batch_id=task.batch_id, kind=task.kind,
                      status=ResultStatus.ERROR, error=exc.to_info(), model=self.model_name, attempt=attempt,
                      timings=Timings(total_ms=round((time.monotonic() - started) * 1000, 2)))

    # ---- bookkeeping -------------------------------------------------------------------
    def _settled(self, outcome: Outcome, result: Result | None, task_id: str | None) -> Outcome:
        log.info("task %s", outcome.value, extra={"task_id": task_id, "outcome": outcome.value})
        self._on_outcome(outcome, result)
        return outcome

    def _attempt(self, delivery: Delivery) -> int:
        """Pub/Sub's count when it gives one, else this worker's own count of the message id."""
        if delivery.delivery_attempt:
            return delivery.delivery_attempt
        if not delivery.message_id:
            return 1
        with self._attempts_lock:
            count = self._attempts.pop(delivery.message_id, 0) + 1
            self._attempts[delivery.message_id] = count
            while len(self._attempts) > 100_000:
                self._attempts.popitem(last=False)
        return count

    @staticmethod
    def _guard(done: Future, fn: Callable[..., None], *args: Any) -> None:
        """A stage that crashes must still settle its delivery (as a retry), never leave it hanging."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("unexpected error while running a task; it will be retried")
            if not done.done():
                done.set_result(Outcome.RETRY)
