"""GPU series in /metrics: read from NVML at scrape time where a GPU is, absent (and harmless) where
none is. This machine has no GPU, so NVML itself is replaced by a small fake `pynvml` module object;
the CPU case runs the real service on the real model."""
from __future__ import annotations

import types
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.app import Runtime, build_runtime
from worker.engine import Engine
from worker.metrics import Metrics
from worker.service import create_app
from worker.service_run import BackgroundServer
from worker.settings import Settings

GIB = 2**30


class FakeNVMLError(Exception):
    pass


def fake_pynvml(gpus: list[dict], *, init_fails: bool = False) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's `pynvml` with the calls the collector makes; each dict is one GPU
    (`util` percent, `used` and `total` bytes, or `broken` to make reading it fail)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError
    nvml.calls = {"init": 0, "shutdown": 0}

    def init() -> None:
        if init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")
        nvml.calls["init"] += 1

    def handle(index: int) -> dict:
        if gpus[index].get("broken"):
            raise FakeNVMLError("GPU is lost")
        return gpus[index]

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: nvml.calls.__setitem__("shutdown", nvml.calls["shutdown"] + 1)
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = handle
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h["util"], memory=0)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=h["used"], total=h["total"],
                                                                   free=h["total"] - h["used"])
    return nvml


def gpu_samples(text: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("gpu", "")): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("gemma_gpu_")}


def test_gpu_utilisation_and_memory_are_read_from_nvml_at_scrape_time() -> None:
    # Given NVML reporting two GPUs
    gpus = [{"util": 37, "used": 3 * GIB, "total": 24 * GIB}, {"util": 0, "used": 0, "total": 24 * GIB}]
    nvml = fake_pynvml(gpus)
    metrics = Metrics()
    # When the metrics watch them and are scraped, the GPUs get busier, and they are scraped again
    assert metrics.watch_gpus(nvml=nvml) is True
    first = gpu_samples(metrics.render().decode())
    gpus[0].update(util=100, used=20 * GIB)
    second = gpu_samples(metrics.render().decode())
    # Then each scrape shows each GPU's utilisation (0 to 1) and memory, labelled by index, as read then
    assert first == {("gemma_gpu_utilization_ratio", "0"): 0.37, ("gemma_gpu_utilization_ratio", "1"): 0.0,
                     ("gemma_gpu_memory_used_bytes", "0"): 3 * GIB, ("gemma_gpu_memory_used_bytes", "1"): 0.0,
                     ("gemma_gpu_memory_total_bytes", "0"): 24 * GIB, ("gemma_gpu_memory_total_bytes", "1"): 24 * GIB}
    assert second[("gemma_gpu_utilization_ratio", "0")] == 1.0
    assert second[("gemma_gpu_memory_used_bytes", "0")] == 20 * GIB
    # And closing releases NVML and removes the series
    metrics.close()
    assert nvml.calls == {"init": 1, "shutdown": 1} and gpu_samples(metrics.render().decode()) == {}


def test_a_gpu_that_cannot_be_read_is_left_out_and_the_scrape_still_answers() -> None:
    # Given NVML with one GPU that fails to read
    metrics = Metrics()
    metrics.watch_gpus(nvml=fake_pynvml([{"broken": True}, {"util": 50, "used": GIB, "total": 2 * GIB}]))
    # When scraped / Then only the readable GPU has series
    assert set(gpu_samples(metrics.render().decode())) == {
        ("gemma_gpu_utilization_ratio", "1"), ("gemma_gpu_memory_used_bytes", "1"),
        ("gemma_gpu_memory_total_bytes", "1")}


@pytest.mark.parametrize("nvml", [fake_pynvml([], init_fails=True), None], ids=["fake-no-driver", "this-machine"])
def test_without_a_working_nvml_there_are_no_gpu_series(nvml: types.ModuleType | None) -> None:
    # Given NVML that cannot start: a fake without a driver, and the real pynvml on this GPU-less machine
    metrics = Metrics()
    # When the metrics are asked to watch GPUs and are scraped
    watching = metrics.watch_gpus(nvml=nvml)
    text = metrics.render().decode()
    # Then nothing is watched and no GPU series (not even their HELP lines) appear
    assert watching is False and "gemma_gpu_" not in text and "gemma_queue_depth" in text


@pytest.fixture(scope="module")
def cpu_runtime(settings: Settings, engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    runtime = build_runtime(settings, results=str(tmp_path_factory.mktemp("metrics")), engine=engine)
    yield runtime
    runtime.close()


@pytest.mark.slow
def test_the_service_on_cpu_exports_no_gpu_series(cpu_runtime: Runtime) -> None:
    # Given the service running the real model on the CPU
    assert cpu_runtime.engine.device.type == "cpu"
    with BackgroundServer(create_app(cpu_runtime)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        # When /metrics is scraped after a request
        assert http.post("/embed", json={"texts": ["no gpu here"]}).status_code == 200
        response = http.get("/metrics")
    # Then it answers with the usual series and none for GPUs, and the cache counters are declared
    assert response.status_code == 200 and "gemma_batch_requests" in response.text
    assert "gemma_gpu_" not in response.text
    assert "# TYPE gemma_cache_hits_total counter" in response.text
    assert "# TYPE gemma_cache_misses_total counter" in response.text

