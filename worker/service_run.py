"""Running the service: `run_service` for `cli.py serve` (uvicorn in the main thread, SIGTERM in
order), and `BackgroundServer` for tests and notebooks (uvicorn in a thread, no signal handling)."""
from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from types import FrameType, TracebackType

import uvicorn
from fastapi import FastAPI

from worker.app import build_runtime
from worker.service import Service, ServiceConfig, create_app
from worker.service_edge import install_request_id_filter
from worker.settings import Settings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, with the service told first on SIGTERM so the pull worker stops before HTTP drains."""

    def __init__(self, config: uvicorn.Config, *, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(sig).name)
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)


def run_service(settings: Settings, *, results: str | None, host: str, port: int, config: ServiceConfig) -> None:
    """Serve until SIGTERM or Ctrl-C. Shutdown order: (1) readiness fails and the pull worker stops
    taking messages, handing queued ones back; (2) uvicorn stops accepting connections and lets requests
    in flight finish, for at most `drain_s`; (3) the pull thread is joined and the engine stopped."""
    loader = functools.partial(build_runtime, settings, results=results)
    app = create_app(loader, settings=settings, config=config)
    install_request_id_filter()
    uv_config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                               timeout_graceful_shutdown=max(1, int(settings.drain_s)), server_header=False)
    # uvicorn re-raises the signal it caught once it is done; let that land on a no-op, so the caller
    # decides how the process exits.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    _Server(uv_config, service=app.state.service).run()


class BackgroundServer:
    """The app on uvicorn in a daemon thread on `host`, port chosen by the OS unless given.

    Use as a context manager; `url` is set once it listens. Leaving stops the server (and the app's
    lifespan), not a runtime the app was given."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server did not start on {self.host} within {self.start_timeout_s}s")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self._thread.join(15)
