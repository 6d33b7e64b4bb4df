"""Result storage over Cloud Storage or a local directory; the only module that touches either.

Results are written create-only: an existing object means the task is done, so redelivery,
restarts and racing workers all end with exactly one result. Small pointer files may instead
be overwritten (`put`) or swapped with compare-and-swap (`put_if_generation`).
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from google.api_core.exceptions import GoogleAPICallError, NotFound, PreconditionFailed, RetryError
from google.auth.exceptions import GoogleAuthError
from requests import RequestException

from schemas.errors import ErrorCode, TaskError

if TYPE_CHECKING:
    from google.cloud import storage

T = TypeVar("T")
JSON = "application/json"
_META_DIR = ".store"  # LocalStore's own bookkeeping; names may not start with "." so none collide


def check_name(name: str, *, prefix: bool = False) -> str:
    """Return name if it is a safe relative object name ("batch/task.json"), else raise ValueError.

    With prefix=True an empty string, a trailing "/" and a partial last segment are allowed.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if prefix and parts[-1:] == [""]:
        parts.pop()  # "" and "batch/" are whole-directory prefixes
    problem = None
    if not isinstance(name, str) or not (name or prefix):
        problem = "it is empty or not a string"
    elif "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it holds a backslash or a control character"
    elif name.startswith("/"):
        problem = "it is absolute"
    elif len(name.encode()) > 1024:
        problem = "it is longer than 1024 bytes"
    elif "" in parts:
        problem = "it has an empty path segment"
    elif any(p.startswith(".") for p in parts):
        problem = "a path segment starts with '.' ('..' would escape the root; '.' names are reserved)"
    if problem:
        raise ValueError(f"unsafe store name {name!r}: {problem}; use relative names like 'batch-1/task-1.json'")
    return name


POOL_SIZE = 32  # at least the runner's I/O threads and the CLI's readers


class Store(ABC):
    """Named blobs under one root. Every method is safe to call from many threads at once."""

    @abstractmethod
    def put_if_absent(self, name: str, data: bytes, *, content_type: str = JSON) -> bool:
        """Create name with data unless it exists. True: this call created it; False: it already existed."""

    @abstractmethod
    def put(self, name: str, data: bytes, *, content_type: str = JSON) -> None:
        """Create or overwrite name; for small pointer and manifest files, never for results."""

    @abstractmethod
    def put_if_generation(self, name: str, data: bytes, *, generation: int | None, content_type: str = JSON) -> bool:
        """Write name only if its generation is still `generation` (None: only if absent); False otherwise."""

    @abstractmethod
    def get_with_generation(self, name: str) -> tuple[bytes, int] | None:
        """The content and generation (for put_if_generation) of name, or None if absent."""

    @abstractmethod
    def get(self, name: str) -> bytes | None:
        """The content of name, or None if absent."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether name exists."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Names (relative to the store root) that start with prefix, in sorted order."""

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Remove name if it exists. True: this call removed it; False: it was not there. For a run's
        own scratch objects (the re-embedding job's checkpoints), never for results."""

    @abstractmethod
    def uri(self, name: str) -> str:
        """Where name lives, for messages and logs."""


class GCSStore(Store):
    """Objects under gs://bucket/prefix. One shared client; transient failures retried within deadline_s.

    A write retried after a lost response may find its own earlier attempt: that 412 returns False,
    so False means "exists now", not "someone else wrote it".
    """

    def __init__(self, bucket: str, prefix: str = "", *, client: storage.Client,
                 deadline_s: float = 60.0, request_timeout_s: float = 30.0) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        self._client = client
        self._bucket = client.bucket(bucket)
        self._prefix = check_name(prefix.strip("/"), prefix=True) if prefix.strip("/") else ""
        self._deadline_s = deadline_s
        self._timeout = request_timeout_s
        # Retry 429, 5xx, resets and timeouts (the library's own predicate), but for a bounded time.
        self._retry = DEFAULT_RETRY.with_timeout(deadline_s).with_delay(initial=0.1, maximum=5.0, multiplier=2.0)

    @classmethod
    def make_client(cls, *, project: str | None = None, api_endpoint: str | None = None) -> storage.Client:
        """Build the client a process shares; STORAGE_EMULATOR_HOST (or api_endpoint) selects an emulator."""
        from google.cloud import storage

        endpoint = api_endpoint or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint:
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project=project or "local-dev", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": endpoint})
        else:
            client = storage.Client(project=project)
        _widen_connection_pool(client, size=POOL_SIZE)
        return client

    def _full(self, name: str) -> str:
        return f"{self._prefix}/{name}" if self._prefix else name

    def uri(self, name: str) -> str:
        return f"gs://{self._bucket.name}/{self._full(name)}"

    def put_if_absent(self, name: str, data: bytes, *, content_type: str = JSON) -> bool:
        return self._upload(name, data, content_type=content_type, if_generation_match=0)

    def put(self, name: str, data: bytes, *, content_type: str = JSON) -> None:
        self._upload(name, data, content_type=content_type, if_generation_match=None)

    def put_if_generation(self, name: str, data: bytes, *, generation: int | None, content_type: str = JSON) -> bool:
        return self._upload(name, data, content_type=content_type,
                            if_generation_match=0 if generation is None else generation)

    def _upload(self, name: str, data: bytes, *, content_type: str, if_generation_match: int | None) -> bool:
        blob = self._bucket.blob(self._full(check_name(name)))
        try:
            self._call("write", name, lambda: blob.upload_from_string(
                data, content_type=content_type, if_generation_match=if_generation_match,
                retry=self._retry, timeout=self._timeout), expected=(PreconditionFailed,))
        except PreconditionFailed:
            return False
        return True

    def get_with_generation(self, name: str) -> tuple[bytes, int] | None:
        blob = self._bucket.blob(self._full(check_name(name)))
        try:
            data = self._call("read", name, lambda: blob.download_as_bytes(retry=self._retry, timeout=self._timeout),
                              expected=(NotFound,))
        except NotFound:
            return None
        return data, int(blob.generation)

    def get(self, name: str) -> bytes | None:
        found = self.get_with_generation(name)
        return found[0] if found else None

    def exists(self, name: str) -> bool:
        blob = self._bucket.blob(self._full(check_name(name)))
        return self._call("check", name, lambda: blob.exists(retry=self._retry, timeout=self._timeout))

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._full(check_name(prefix, prefix=True))
        skip = len(self._prefix) + 1 if self._prefix else 0
        names = self._call("list", prefix, lambda: [b.name[skip:] for b in self._client.list_blobs(
            self._bucket, prefix=full, retry=self._retry, timeout=self._timeout)])
        return iter(sorted(names))

    def delete(self, name: str) -> bool:
        blob = self._bucket.blob(self._full(check_name(name)))
        try:
            # A retry after a lost response finds the object gone: NotFound, reported as not removed here.
            self._call("delete", name, lambda: blob.delete(retry=self._retry, timeout=self._timeout),
                       expected=(NotFound,))
        except NotFound:
            return False
        return True

    def _call(self, op: str, name: str, fn: Callable[[], T], *, expected: tuple[type[Exception], ...] = ()) -> T:
        """Run one client call; any failure but `expected` becomes a retryable STORAGE_UNAVAILABLE."""
        try:
            return fn()
        except expected:
            raise
        except RetryError as exc:
            detail = f"gave up retrying within {self._deadline_s:g}s; last error: {exc.cause!r}"
            raise self._unavailable(op, name, detail) from exc
        except GoogleAPICallError as exc:
            detail = f"HTTP {exc.code}: {exc.message}{_HINTS.get(exc.code or 0, '')}"
            raise self._unavailable(op, name, detail) from exc
        except (GoogleAuthError, RequestException, OSError) as exc:
            detail = f"{exc!r}; check credentials and that Cloud Storage is reachable"
            raise self._unavailable(op, name, detail) from exc

    def _unavailable(self, op: str, name: str, detail: str) -> TaskError:
        return TaskError(ErrorCode.STORAGE_UNAVAILABLE, f"{op} {self.uri(name)} failed: {detail}", retryable=True)

_HINTS = {
    401: "; the credentials were rejected, refresh them (gcloud auth application-default login)",
    403: "; grant the service account roles/storage.objectUser on the bucket",
    404: "; the bucket does not exist, create it or fix the results location",
}


class LocalStore(Store):
    """Files under root. Create-only writes are atomic via link(2), so racing processes get one winner.

    put and put_if_generation serialise on a flock in root/.store and keep a per-name generation
    counter there; CAS holds across threads and processes on one host (flock is unreliable on NFS).
    Editing or deleting files by hand voids the generation guarantee.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*check_name(name).split("/"))

    def uri(self, name: str) -> str:
        return str(self.root / name)

    def put_if_absent(self, name: str, data: bytes, *, content_type: str = JSON) -> bool:
        path = self._path(name)
        with self._os_errors("write", name):
            return self._link_new(path, data)

    def put(self, name: str, data: bytes, *, content_type: str = JSON) -> None:
        path = self._path(name)
        with self._os_errors("write", name), self._locked(exclusive=True):
            self._replace(name, path, data, generation=self._generation(name, path))

    def put_if_generation(self, name: str, data: bytes, *, generation: int | None, content_type: str = JSON) -> bool:
        path = self._path(name)
        with self._os_errors("write", name), self._locked(exclusive=True):
            if self._generation(name, path) != generation:
                return False
            if generation is None:
                # put_if_absent takes no lock, so creation must still go through link(2).
                return self._link_new(path, data)
            self._replace(name, path, data, generation=generation)
            return True

    def get_with_generation(self, name: str) -> tuple[bytes, int] | None:
        path = self._path(name)
        with self._os_errors("read", name), self._locked(exclusive=False):
            generation = self._generation(name, path)
            return None if generation is None else (path.read_bytes(), generation)

    def get(self, name: str) -> bytes | None:
        path = self._path(name)
        with self._os_errors("read", name):
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        check_name(prefix, prefix=True)
        directory = prefix.rpartition("/")[0]
        names = []
        for dirpath, dirnames, filenames in os.walk(self.root.joinpath(*directory.split("/")) if directory
                                                    else self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            names += [n for f in filenames if not f.startswith(".")
                      and (n := f if rel == "." else f"{rel}/{f}").startswith(prefix)]
        return iter(sorted(names))

    def delete(self, name: str) -> bool:
        path = self._path(name)
        with self._os_errors("delete", name), self._locked(exclusive=True):
            try:
                path.unlink()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return False
            self.root.joinpath(_META_DIR, "generations", *name.split("/")).unlink(missing_ok=True)
            return True

    def _link_new(self, path: Path, data: bytes) -> bool:
        tmp = self._write_temp(path.parent, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return True

    def _replace(self, name: str, path: Path, data: bytes, *, generation: int | None) -> None:
        # Counter first: a crash in between leaves a new generation on old data, never old on new.
        # Never 1 again: that is the implied generation of any file put_if_absent made without the lock.
        counter = self.root.joinpath(_META_DIR, "generations", *name.split("/"))
        os.replace(self._write_temp(counter.parent, str((generation or 1) + 1).encode()), counter)
        os.replace(self._write_temp(path.parent, data), path)
        _fsync_dir(path.parent)

    def _generation(self, name: str, path: Path) -> int | None:
        if not path.is_file():
            return None
        try:
            return int(self.root.joinpath(_META_DIR, "generations", *name.split("/")).read_text())
        except FileNotFoundError:
            return 1  # created by put_if_absent, never rewritten

    @staticmethod
    def _write_temp(directory: Path, data: bytes) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(fd)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return Path(tmp)

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        lock = self.root / _META_DIR / "lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _os_errors(self, op: str, name: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise TaskError(ErrorCode.STORAGE_UNAVAILABLE, (
                f"{op} {self.uri(name)} failed: {exc.strerror or exc}; check free space and permissions "
                f"on {self.root}"), retryable=True) from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _widen_connection_pool(client: storage.Client, *, size: int) -> None:
    """One pooled connection per I/O thread, so concurrent writes reuse connections instead of
    opening and discarding them (the default pool keeps 10)."""
    from requests.adapters import HTTPAdapter

    adapter = HTTPAdapter(pool_connections=size, pool_maxsize=size)
    client._http.mount("https://", adapter)
    client._http.mount("http://", adapter)


def open_store(location: str, *, client: storage.Client | None = None) -> Store:
    """gs://bucket/prefix gives a GCSStore (with client, or one built from the environment); else a LocalStore."""
    if location.startswith("gs://"):
        bucket, _, prefix = location.removeprefix("gs://").partition("/")
        if not bucket:
            raise ValueError(f"results location {location!r} names no bucket; use gs://BUCKET/PREFIX")
        return GCSStore(bucket, prefix, client=client or GCSStore.make_client())
    return LocalStore(Path(location))
