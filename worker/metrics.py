"""Prometheus metrics for one service instance, in its own registry (never the global one), so two
apps in one process (tests, embedding) count separately. Fed by the batcher's and runner's hooks
(through `Stats` listeners) and by the HTTP layer."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from schemas.result import GenerateOutput, Result
from worker.batcher import BatchStats
from worker.runner import Outcome

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every series this service exports; methods are safe from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gemma_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("gemma_http_request_seconds", "HTTP request latency by route.",
                                         ["route"], buckets=_SECONDS_BUCKETS, registry=r)
        self.batch_requests = Histogram("gemma_batch_requests", "Requests (HTTP calls or tasks) per engine call.",
                                        ["kind"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_inputs = Histogram("gemma_batch_inputs", "Inputs (texts or prompts) per engine call.",
                                      ["kind"], buckets=_BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("gemma_queue_wait_seconds", "Time the oldest request of an engine call queued.",
                                    ["kind"], buckets=_SECONDS_BUCKETS, registry=r)
        self.engine_seconds = Histogram("gemma_engine_call_seconds", "Time one engine call ran.",
                                        ["kind"], buckets=_SECONDS_BUCKETS, registry=r)
        self.tokens_in = Counter("gemma_tokens_in", "Input tokens sent to the engine.", ["kind"], registry=r)
        self.tokens_out = Counter("gemma_tokens_out", "Tokens generated.", registry=r)
        self.errors = Counter("gemma_errors", "Errors by code, from HTTP answers and task results.",
                              ["code"], registry=r)
        self.outcomes = Counter("gemma_task_outcomes", "Task outcomes (pull and push) from the runner.",
                                ["outcome"], registry=r)
        self.model_load = Gauge("gemma_model_load_seconds", "Model load and warm-up time; 0 until loaded.",
                                registry=r)
        self.in_flight = Gauge("gemma_http_in_flight_requests", "Inference and push requests admitted, not done.",
                               registry=r)
        self.queue_depth = Gauge("gemma_queue_depth", "Requests waiting in the batcher's queue.", registry=r)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    # ---- Stats listener (engine and I/O threads) ------------------------------------------
    def on_batch(self, stats: BatchStats) -> None:
        self.batch_requests.labels(stats.kind).observe(stats.requests)
        self.batch_inputs.labels(stats.kind).observe(stats.inputs)
        self.queue_wait.labels(stats.kind).observe(stats.queue_ms / 1000)
        self.engine_seconds.labels(stats.kind).observe(stats.run_ms / 1000)
        self.tokens_in.labels(stats.kind).inc(stats.tokens)

    def on_outcome(self, outcome: Outcome, result: Result | None) -> None:
        self.outcomes.labels(outcome.value).inc()
        if result is None:
            return
        if result.error is not None:
            self.errors.labels(result.error.code.value).inc()
        if isinstance(result.output, GenerateOutput):
            self.tokens_out.inc(result.output.completion_tokens)

    # ---- HTTP layer -----------------------------------------------------------------------
    def on_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
