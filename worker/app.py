"""Startup: build the engine, batcher, store and runner once and hand them to the doors."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from schemas.result import Result
from worker.batcher import BatchStats, TokenBudgetBatcher
from worker.engine import Engine, build_engine
from worker.runner import Outcome, Runner
from worker.settings import Settings
from worker.store import Store, open_store
from worker.tasks import TaskContext

log = logging.getLogger(__name__)


class StatsListener(Protocol):
    """Something else that wants every batch and outcome, such as the service's Prometheus metrics."""

    def on_batch(self, stats: BatchStats) -> None: ...

    def on_outcome(self, outcome: Outcome, result: Result | None) -> None: ...

    def on_cache(self, kind: str, hit: bool) -> None: ...


@dataclass
class Stats:
    """Counters every door and /metrics read; updated from the engine and I/O threads."""

    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    cache: Counter = field(default_factory=Counter)  # "hit" / "miss": result cache lookups
    batch_requests: list[int] = field(default_factory=list)
    listeners: list[StatsListener] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_batch(self, stats: BatchStats) -> None:
        with self.lock:
            self.batch_requests.append(stats.requests)
            del self.batch_requests[:-10_000]
        log.info("batch done", extra={"kind": stats.kind, "requests": stats.requests, "inputs": stats.inputs,
                                      "tokens": stats.tokens, "queue_ms": round(stats.queue_ms, 1),
                                      "run_ms": round(stats.run_ms, 1)})
        self._tell("on_batch", stats)

    def on_outcome(self, outcome: Outcome, result: Result | None) -> None:
        with self.lock:
            self.outcomes[outcome.value] += 1
            if result is not None and result.error is not None:
                self.errors[result.error.code.value] += 1
        self._tell("on_outcome", outcome, result)

    def on_cache(self, kind: str, hit: bool) -> None:
        with self.lock:
            self.cache["hit" if hit else "miss"] += 1
        self._tell("on_cache", kind, hit)

    def _tell(self, method: str, *args: object) -> None:
        # Called on the engine thread: a failing listener must cost a log line, not the engine.
        for listener in tuple(self.listeners):
            try:
                getattr(listener, method)(*args)
            except Exception:  # noqa: BLE001
                log.exception("stats listener %s failed", type(listener).__name__)


@dataclass
class Runtime:
    """One model, one batcher, and (given a results location) one store and runner, shared by every door."""

    settings: Settings
    engine: Engine
    batcher: TokenBudgetBatcher
    store: Store | None
    runner: Runner | None
    stats: Stats
    load_s: float = 0.0  # model load plus warm-up, for /metrics

    def close(self) -> None:
        """Stop the engine after its current call, then let pending writes finish."""
        self.batcher.stop(timeout=1.0)
        if self.runner is not None:
            self.runner.close()


def build_runtime(settings: Settings, *, results: str | None, engine: Engine | None = None) -> Runtime:
    """Load (unless `engine` is given) and warm the model, and start the batcher. Without `results`
    there is no store and no runner: such a runtime serves only the synchronous HTTP routes."""
    started = time.monotonic()
    store = open_store(results) if results is not None else None
    if engine is None:
        engine = load_engine(settings)
    stats = Stats()
    batcher = TokenBudgetBatcher(engine, max_wait_s=settings.max_wait_ms / 1000, max_items=4 * settings.max_batch_size,
                                 on_batch=stats.on_batch).start()
    runner = None
    if store is not None:
        runner = Runner(ctx=TaskContext(settings=settings, engine=engine, batcher=batcher), store=store,
                        on_outcome=stats.on_outcome, on_cache=stats.on_cache)
    return Runtime(settings=settings, engine=engine, batcher=batcher, store=store, runner=runner, stats=stats,
                   load_s=time.monotonic() - started)


def _build_and_warm(settings: Settings) -> Engine:
    engine = build_engine(settings)
    log.info("model warmed up in %.1fs", engine.warm_up())
    return engine


def load_engine(settings: Settings) -> Engine:
    """Build and warm the engine on a thread of its own, which then exits.

    PyTorch's CPU kernels run on OpenMP, and GNU OpenMP keeps a team of threads for every thread
    that has run a parallel region until that thread exits. Loaded on the main thread, a serving
    process would hold two teams (the main thread's, the engine thread's) on its cores; libgomp then
    counts more threads than cores and barely spin-waits at its barriers, so the engine thread's
    kernels keep waiting for a sleeping partner to wake (docs/PERFORMANCE.md, "One OpenMP team")."""
    with ThreadPoolExecutor(1, thread_name_prefix="load-model") as loader:  # its thread exits on leaving
        return loader.submit(_build_and_warm, settings).result()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM (Cloud Run's 10 s notice) and Ctrl-C both start the orderly shutdown."""
    def handler(signum: int, frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def exit_process(code: int = 0) -> None:
    """Leave without interpreter finalisation: the engine thread may still be inside a native call
    (its results are not needed any more), and tearing down modules under it aborts the process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_pull_worker(settings: Settings, *, subscription: str, results: str) -> Stats:
    """The `worker` command: pull, run, write, ack, until a signal; then shut down in order."""
    from worker.source import PullWorker

    stop = threading.Event()
    stop_on_signals(stop)
    started = time.monotonic()
    runtime = build_runtime(settings, results=results)
    log.info("worker ready in %.1fs: %s -> %s", time.monotonic() - started, subscription, runtime.store.uri(""))
    try:
        PullWorker(runner=runtime.runner, subscription=subscription, settings=settings).run(stop)
    finally:
        runtime.close()
        log.info("worker stopped (result cache: %s)", dict(runtime.stats.cache),
                 extra={"outcome": dict(runtime.stats.outcomes)})
    return runtime.stats
