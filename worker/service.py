"""The HTTP door: health, synchronous inference (`/generate`, `/embed`, OpenAI-compatible `/v1/...`),
Pub/Sub push, and metrics, over the same runtime (model, batcher, runner) as the pull worker.

`create_app` builds one app around a runtime, or around a loader that runs in the background at
startup, so `/healthz` answers at once and `/readyz` says 503 until the model is warm."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from schemas.errors import ErrorCode, TaskError
from worker.app import Runtime, exit_process
from worker.auth import PushAuthConfig, PushVerifier
from worker.metrics import CONTENT_TYPE, Metrics
from worker.service_edge import EdgeMiddleware
from worker.service_errors import Overloaded, install_error_handlers
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """Limits enforced at the edge; None means "the engine's own limit". Input tokens per text or prompt
    are the engine's (--max-input-tokens), checked when the task handler tokenizes."""

    max_request_bytes: int = 16 * 1024 * 1024  # a 10 MB Pub/Sub message is ~13.4 MB once base64'd in a push
    max_texts: int | None = None  # texts per /embed or /v1/embeddings request (default: settings.max_texts_per_task)
    max_tokens: int | None = None  # max_tokens a request may ask for (default: engine.max_new_tokens)
    max_queued_requests: int = 256  # inference and push requests admitted at once; more get 429
    retry_after_s: int = 1


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    push_auth: PushAuthConfig | None = None  # None: /pubsub/push takes unauthenticated requests
    subscription: str | None = None  # also pull from this subscription, on the same runtime


class Admission:
    """Counts inference and push requests in flight; over the limit is a 429 rather than a long queue."""

    def __init__(self, *, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.count = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.count >= self.limit:
                raise Overloaded(limit=self.limit, retry_after_s=self.retry_after_s)
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


class Service:
    """What the routes share: the runtime once it is loaded, limits, metrics, and the pull worker."""

    def __init__(self, *, settings: Settings, config: ServiceConfig, metrics: Metrics) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.admission = Admission(limit=config.limits.max_queued_requests,
                                   retry_after_s=config.limits.retry_after_s)
        self.verifier = PushVerifier(config.push_auth) if config.push_auth else None
        self.started = time.monotonic()
        self.created = int(time.time())
        self.runtime: Runtime | None = None
        self.stopping = threading.Event()
        self._owns_runtime = False
        self._pull_stop = threading.Event()
        self._pull_thread: threading.Thread | None = None
        metrics.in_flight.set_function(lambda: self.admission.count)

    # ---- life ------------------------------------------------------------------------------
    def load_in_background(self, load: Callable[[], Runtime]) -> None:
        """Load the model off the event loop; a load that fails ends the process so the platform
        restarts it, rather than leaving a live server that can never become ready."""
        def run() -> None:
            try:
                runtime = load()
            except BaseException:  # noqa: BLE001
                log.critical("model failed to load; exiting", exc_info=True)
                exit_process(70)
                return
            self._owns_runtime = True
            self.attach(runtime)

        threading.Thread(target=run, name="load-model", daemon=True).start()

    def attach(self, runtime: Runtime) -> None:
        runtime.stats.listeners.append(self.metrics)
        self.metrics.watch_queue(lambda: runtime.batcher.depth)
        self.metrics.model_load.set(runtime.load_s)
        if runtime.engine.device.type == "cuda":
            self.metrics.watch_gpus()
        if runtime.engine.decoder is not None and runtime.engine.decoder.screen_wanted:
            self.metrics.watch_head_screen(runtime.engine.decoder)
        if self.config.subscription and runtime.runner is not None and not self.stopping.is_set():
            self._start_pull(runtime)
        self.runtime = runtime
        log.info("service ready: %s on %s", runtime.engine.name, runtime.engine.device)

    def begin_shutdown(self) -> None:
        """First step on SIGTERM, before the HTTP server drains: stop pulling (the pull worker hands
        back queued tasks and gives its engine call `drain_s` to finish) and fail readiness."""
        self.stopping.set()
        self._pull_stop.set()

    def close(self) -> None:
        self.begin_shutdown()
        if self._pull_thread is not None:
            self._pull_thread.join(self.settings.drain_s + 3)
        if self.runtime is not None:
            self.runtime.stats.listeners[:] = [x for x in self.runtime.stats.listeners if x is not self.metrics]
            if self._owns_runtime:
                self.runtime.close()
        self.metrics.close()

    def _start_pull(self, runtime: Runtime) -> None:
        from worker.source import PullWorker

        worker = PullWorker(runner=runtime.runner, subscription=self.config.subscription, settings=runtime.settings)

        def run() -> None:
            try:
                worker.run(self._pull_stop)
            except BaseException:  # noqa: BLE001 - a dead puller must not hide behind a live HTTP server
                log.critical("pull worker died; exiting", exc_info=True)
                exit_process(70)

        self._pull_thread = threading.Thread(target=run, name="pull", daemon=True)
        self._pull_thread.start()

    # ---- for routes --------------------------------------------------------------------------
    def ready_runtime(self) -> Runtime:
        if self.runtime is None:
            raise TaskError(ErrorCode.MODEL_UNAVAILABLE, "the model is still loading; retry in a few seconds",
                            retryable=True)
        return self.runtime

    @property
    def status(self) -> str:
        return "stopping" if self.stopping.is_set() else "ready" if self.runtime is not None else "loading"


def create_app(runtime: Runtime | Callable[[], Runtime], *, settings: Settings | None = None,
               config: ServiceConfig | None = None) -> FastAPI:
    """The service around `runtime`, or around a loader called in the background at startup (then
    `settings` is required, for /healthz before the model is there). A runtime passed in is not closed."""
    from worker.service_inference import router as inference_router
    from worker.service_openai import router as openai_router
    from worker.service_push import router as push_router

    if settings is None:
        if not isinstance(runtime, Runtime):
            raise ValueError("create_app needs settings when the runtime is loaded in the background")
        settings = runtime.settings
    config = config or ServiceConfig()
    service = Service(settings=settings, config=config, metrics=Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(runtime, Runtime):
            service.attach(runtime)
        else:
            service.load_in_background(runtime)
        yield
        service.close()

    app = FastAPI(title="gemma-batch", version="1", lifespan=lifespan,
                  description="Batched Gemma inference: synchronous, OpenAI-compatible, and Pub/Sub push.")
    app.state.service = service
    install_error_handlers(app, retry_after_s=config.limits.retry_after_s,
                           on_error=lambda code: service.metrics.errors.labels(code).inc())
    app.add_middleware(EdgeMiddleware, metrics=service.metrics, max_request_bytes=config.limits.max_request_bytes)
    for router in (health_router(), inference_router, openai_router, push_router):
        app.include_router(router)
    return app


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="Liveness, model and queue state; answers while the model loads")
    async def healthz(request: Request) -> dict[str, Any]:
        service: Service = request.app.state.service
        runtime = service.runtime
        body: dict[str, Any] = {
            "status": service.status,
            "model": runtime.engine.name if runtime else service.settings.model,
            "device": str(runtime.engine.device) if runtime else service.settings.device,
            "gpu_available": torch.cuda.is_available(),
            "queue_depth": runtime.batcher.depth if runtime else 0,
            "in_flight": service.admission.count,
            "uptime_s": round(time.monotonic() - service.started, 3),
        }
        if body["gpu_available"]:
            free, total = torch.cuda.mem_get_info()
            body["gpu"] = {"name": torch.cuda.get_device_name(), "memory_total_mb": total // 2**20,
                           "memory_free_mb": free // 2**20,
                           "memory_allocated_mb": torch.cuda.memory_allocated() // 2**20}
        return body

    @router.get("/readyz", summary="200 once the model is loaded and warm, else 503",
                responses={503: {"description": "loading or stopping"}})
    async def readyz(request: Request) -> JSONResponse:
        service: Service = request.app.state.service
        status = service.status
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503,
                            headers=None if status == "ready" else {"Retry-After": "1"})

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        service: Service = request.app.state.service
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return router
