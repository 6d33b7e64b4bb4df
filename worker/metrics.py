"""Prometheus metrics for one service instance, in its own registry (never the global one), so two
apps in one process (tests, embedding) count separately. Fed by the batcher's and runner's hooks
(through `Stats` listeners) and by the HTTP layer; GPU figures are read from NVML at scrape time."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from schemas.result import GenerateOutput, Result

if TYPE_CHECKING:  # type names only: the module itself needs neither (nor the storage client they import)
    from worker.batcher import BatchStats
    from worker.decode import Decoder
    from worker.runner import Outcome

log = logging.getLogger(__name__)
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
        self.cache_hits = Counter("gemma_cache_hits", "Tasks answered from the result cache, without the engine.",
                                  ["kind"], registry=r)
        self.cache_misses = Counter("gemma_cache_misses", "Cacheable tasks not in the result cache, so run.",
                                    ["kind"], registry=r)
        self._gpus: GpuCollector | None = None

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def watch_head_screen(self, decoder: Decoder) -> None:
        """Export how the greedy head answered rows: by its screen or by the full output layer
        (worker/model/head_screen.py), read from the decoder when scraped."""
        self.registry.register(HeadScreenCollector(decoder))

    def watch_gpus(self, nvml: Any | None = None) -> bool:
        """Export GPU utilisation and memory from NVML (`pynvml`, or the module given); False, and no
        series at all, where NVML cannot start (no driver, no library)."""
        if self._gpus is not None:
            return True
        lib = open_nvml(nvml)
        if lib is None:
            return False
        try:
            collector = GpuCollector(lib)
        except Exception as exc:  # noqa: BLE001 - metrics must never stop the service from starting
            log.warning("GPU metrics off: NVML could not count the GPUs (%s)", exc)
            _shutdown_nvml(lib)
            return False
        self.registry.register(collector)
        self._gpus = collector
        return True

    def close(self) -> None:
        """Release NVML, if this instance opened it."""
        if self._gpus is not None:
            self.registry.unregister(self._gpus)
            _shutdown_nvml(self._gpus.nvml)
            self._gpus = None

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
        if isinstance(result.output, GenerateOutput) and not result.cached:
            self.tokens_out.inc(result.output.completion_tokens)

    def on_cache(self, kind: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(kind).inc()

    # ---- HTTP layer -----------------------------------------------------------------------
    def on_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def open_nvml(nvml: Any | None = None) -> Any | None:
    """NVML initialised (the `pynvml` of nvidia-ml-py unless a module is given), or None where it cannot be."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded ...
        log.warning("GPU metrics off: NVML did not start (%s)", exc)
        return None
    return nvml


def _shutdown_nvml(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - nothing left to release
        pass


class HeadScreenCollector(Collector):
    """Greedy rows by the path that picked their token, from one decoder's counters."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("gemma_greedy_head_rows", "Greedy decode rows by how the output layer picked "
                                     "their token: 'screened' (bf16, int8 or int4 screen, fp32 re-score), 'unsure' (every word "
                                     "in fp32, the screen unsure of the row), 'full' (every word in fp32, no screen "
                                     "asked: none built yet, dropped by its trial, turned off, or more rows in the call "
                                     "than it wins at) or 'permitted' (a constrained row whose grammar permitted few "
                                     "words, only those scored).", labels=["path"])
        family.add_metric(["screened"], self.decoder.screened_rows)
        family.add_metric(["unsure"], self.decoder.unsure_rows)
        family.add_metric(["full"], self.decoder.full_rows)
        family.add_metric(["permitted"], self.decoder.allowed_rows)
        yield family


class GpuCollector(Collector):
    """Utilisation and memory of every GPU NVML sees, labelled by NVML index, read when scraped."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.count = int(nvml.nvmlDeviceGetCount())

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        util, used, total = self._families()
        for index in range(self.count):
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # noqa: BLE001 - a GPU unreadable now is left out; the scrape still answers
                log.debug("GPU %d not read: %s", index, exc)
                continue
            label = [str(index)]
            util.add_metric(label, rates.gpu / 100)
            used.add_metric(label, memory.used)
            total.add_metric(label, memory.total)
        yield from (family for family in (util, used, total) if family.samples)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("gemma_gpu_utilization_ratio", "Share of the last sample period the GPU was "
                                  "busy (NVML), 0 to 1.", labels=["gpu"]),
                GaugeMetricFamily("gemma_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).",
                                  labels=["gpu"]),
                GaugeMetricFamily("gemma_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=["gpu"])]
