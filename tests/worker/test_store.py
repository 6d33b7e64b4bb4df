"""worker/store.py against a real directory and a real fake-gcs-server."""
from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from schemas.errors import ErrorCode, TaskError
from worker.devservices import free_port
from worker.store import GCSStore, LocalStore, Store, open_store

if TYPE_CHECKING:
    from google.cloud import storage


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.emulator)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Each behaviour test runs once on a LocalStore and once on a GCSStore with a prefix."""
    if request.param == "local":
        return LocalStore(tmp_path / "results")
    client = request.getfixturevalue("gcs_client")
    return GCSStore(request.getfixturevalue("gcs_bucket"), "results/run-1", client=client)


def test_put_if_absent_creates_once_and_keeps_first_content(store: Store) -> None:
    # Given an empty store
    # When the same name is written twice with different content
    first = store.put_if_absent("batch-1/task-1.json", b'{"n": 1}')
    second = store.put_if_absent("batch-1/task-1.json", b'{"n": 2}')
    # Then only the first write created it, and its content is unchanged
    assert (first, second) == (True, False)
    assert store.get("batch-1/task-1.json") == b'{"n": 1}'


def test_get_exists_and_list_by_prefix(store: Store) -> None:
    # Given objects in two batches, one with a name that shares a string prefix
    for name in ["b/2.json", "a/2.json", "a/1.json", "ab/3.json"]:
        store.put_if_absent(name, name.encode())
    # When they are read and listed by prefix
    # Then reads see what was written, misses are None/False, and listings are sorted and relative
    assert store.get("a/1.json") == b"a/1.json"
    assert store.get("a/9.json") is None
    assert store.exists("ab/3.json") and not store.exists("a/9.json")
    assert not store.exists("a")  # a directory-like prefix is not an object
    assert list(store.list("a/")) == ["a/1.json", "a/2.json"]
    assert list(store.list("a")) == ["a/1.json", "a/2.json", "ab/3.json"]
    assert list(store.list()) == ["a/1.json", "a/2.json", "ab/3.json", "b/2.json"]
    assert list(store.list("zzz/")) == []


def test_delete_removes_an_object_once_and_a_deleted_name_can_be_created_again(store: Store) -> None:
    # Given two objects, one of them rewritten (so it has a later generation)
    store.put_if_absent("run/_chunks/a.parquet", b"a")
    store.put("run/p.json", b"1")
    store.put("run/p.json", b"2")
    # When each is deleted, and deleted again
    # Then the first delete removes it (gone from get, exists and list), the second finds nothing
    assert store.delete("run/_chunks/a.parquet") and not store.delete("run/_chunks/a.parquet")
    assert store.get("run/_chunks/a.parquet") is None and not store.exists("run/_chunks/a.parquet")
    assert store.delete("run/p.json") and list(store.list("run/")) == []
    assert not store.delete("run/never.json")
    # And a deleted name is absent for create-only and compare-and-swap writes alike
    assert store.put_if_generation("run/p.json", b"3", generation=None)
    assert store.put_if_absent("run/_chunks/a.parquet", b"again") and store.get("run/p.json") == b"3"


def test_concurrent_put_if_absent_has_exactly_one_winner(store: Store) -> None:
    # Given 8 threads that start writing the same name at the same moment
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def write(i: int) -> None:
        barrier.wait()
        results[i] = store.put_if_absent("race/task.json", f"writer {i}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    # When they all finish
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then exactly one created it, and the stored content is the winner's
    winners = [i for i, created in results.items() if created]
    assert len(results) == 8 and len(winners) == 1
    assert store.get("race/task.json") == f"writer {winners[0]}".encode()


def test_put_if_generation_is_compare_and_swap(store: Store) -> None:
    # Given a pointer created only-if-absent
    assert store.put_if_generation("ptr.json", b"v1", generation=None) is True
    assert store.put_if_generation("ptr.json", b"other", generation=None) is False
    data, gen1 = store.get_with_generation("ptr.json")  # type: ignore[misc]
    assert data == b"v1"
    # When it is swapped with the current generation, then again with the now-stale one
    assert store.put_if_generation("ptr.json", b"v2", generation=gen1) is True
    assert store.put_if_generation("ptr.json", b"stale", generation=gen1) is False
    # Then the swap landed, and a plain put also moves the generation on
    data, gen2 = store.get_with_generation("ptr.json")  # type: ignore[misc]
    assert data == b"v2" and gen2 != gen1
    store.put("ptr.json", b"v3")
    assert store.put_if_generation("ptr.json", b"stale", generation=gen2) is False
    assert store.get("ptr.json") == b"v3"
    assert store.get_with_generation("missing.json") is None
    # And an object made by put_if_absent has a generation that CAS accepts
    store.put_if_absent("made.json", b"m1")
    assert store.put_if_generation("made.json", b"m2", generation=store.get_with_generation("made.json")[1]) is True  # type: ignore[index]


def test_concurrent_compare_and_swap_loses_no_update(store: Store) -> None:
    # Given a counter and 8 threads that each add 1 five times with read / CAS / retry
    store.put("counter", b"0")

    def add_five() -> None:
        for _ in range(5):
            while True:
                data, gen = store.get_with_generation("counter")  # type: ignore[misc]
                if store.put_if_generation("counter", str(int(data) + 1).encode(), generation=gen):
                    break

    threads = [threading.Thread(target=add_five) for _ in range(8)]
    # When they all finish
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then no increment was lost
    assert store.get("counter") == b"40"


@pytest.mark.parametrize("name", ["../outside.json", "a/../../outside.json", "/etc/passwd", "a\\b.json",
                                  "a\x00b", "a\nb", "", "a//b", "a/", ".store/lock", "./a"])
def test_local_store_rejects_names_that_could_escape(tmp_path: Path, name: str) -> None:
    # Given a local store in a subdirectory
    store = LocalStore(tmp_path / "root")
    # When an unsafe name is used for a write, a read or a check
    # Then each raises ValueError naming the problem, and nothing is written anywhere
    for call in (lambda: store.put_if_absent(name, b"x"), lambda: store.get(name), lambda: store.exists(name),
                 lambda: store.put(name, b"x")):
        with pytest.raises(ValueError, match="unsafe store name"):
            call()
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_local_store_leaves_no_temp_files_and_hides_its_bookkeeping(tmp_path: Path) -> None:
    # Given a local store written with each kind of write
    store = LocalStore(tmp_path)
    store.put_if_absent("a/x.json", b"1")
    store.put_if_absent("a/x.json", b"2")
    store.put("a/p.json", b"1")
    # When the directory is inspected
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    # Then only the objects and the .store bookkeeping exist, and listing shows only the objects
    assert [f for f in files if not f.startswith(".store/")] == ["a/p.json", "a/x.json"]
    assert list(store.list()) == ["a/p.json", "a/x.json"]


@pytest.mark.emulator
def test_open_store_picks_the_backend_from_the_location(tmp_path: Path, gcs_client: storage.Client,
                                                        gcs_bucket: str) -> None:
    # Given a gs:// location and a directory
    # When stores are opened for both
    remote = open_store(f"gs://{gcs_bucket}/results/x", client=gcs_client)
    local = open_store(str(tmp_path))
    # Then each is the right kind and names map under the prefix
    assert isinstance(remote, GCSStore) and isinstance(local, LocalStore)
    assert remote.uri("b/t.json") == f"gs://{gcs_bucket}/results/x/b/t.json"
    remote.put_if_absent("b/t.json", b"{}")
    assert gcs_client.bucket(gcs_bucket).blob("results/x/b/t.json").download_as_bytes() == b"{}"
    with pytest.raises(ValueError, match="names no bucket"):
        open_store("gs:///x")


@pytest.mark.emulator
def test_gcs_missing_bucket_is_a_clear_storage_error(gcs_client: storage.Client) -> None:
    # Given a store on a bucket that does not exist
    store = GCSStore("no-such-bucket-here", client=gcs_client, deadline_s=2)
    # When a result is written
    with pytest.raises(TaskError) as caught:
        store.put_if_absent("t.json", b"{}")
    # Then the error says storage is unavailable, why, and that a retry may help
    assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE and caught.value.retryable
    assert "bucket does not exist" in caught.value.message


def test_gcs_unreachable_server_fails_within_the_deadline() -> None:
    # Given a store whose endpoint has nothing listening
    client = GCSStore.make_client(project="p", api_endpoint=f"http://127.0.0.1:{free_port()}")
    store = GCSStore("bucket", client=client, deadline_s=1.0, request_timeout_s=1.0)
    # When a result is written
    began = time.monotonic()
    with pytest.raises(TaskError) as caught:
        store.put_if_absent("t.json", b"{}")
    # Then it gave up after retrying for about the deadline, with a retryable storage error
    assert time.monotonic() - began < 5
    assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE and caught.value.retryable
    assert "retrying" in caught.value.message


class _FaultyProxy(ThreadingHTTPServer):
    """A real HTTP proxy to the storage server that spoils the next uploads as listed in `faults`.

    "503": answer 503 without forwarding; "lost": forward, then answer 503 as if the reply was lost.
    """

    daemon_threads = True

    def __init__(self, upstream_port: int, faults: list[str]) -> None:
        self.upstream_port, self.faults, self.uploads = upstream_port, faults, 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _FaultyProxy

    def _proxy(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = None
        if self.path.startswith("/upload/"):
            self.server.uploads += 1
            fault = self.server.faults.pop(0) if self.server.faults else None
        if fault != "503":
            upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=10)
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            response = upstream.getresponse()
            status, headers, payload = response.status, response.getheaders(), response.read()
            upstream.close()
        if fault is not None:
            status, headers, payload = 503, [], b'{"error": {"code": 503, "message": "injected"}}'
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def faulty_proxy(storage_server) -> Iterator[_FaultyProxy]:  # noqa: ANN001 - fixture from the plugin
    proxy = _FaultyProxy(storage_server.port, [])
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join()


@pytest.mark.emulator
def test_gcs_write_is_retried_after_a_transient_503(faulty_proxy: _FaultyProxy, gcs_bucket: str) -> None:
    # Given a storage path that answers 503 to the first two uploads
    faulty_proxy.faults[:] = ["503", "503"]
    client = GCSStore.make_client(project="p", api_endpoint=f"http://127.0.0.1:{faulty_proxy.server_port}")
    store = GCSStore(gcs_bucket, client=client, deadline_s=10)
    # When a result is written
    created = store.put_if_absent("t.json", b"payload")
    # Then it was retried until it landed
    assert created is True and faulty_proxy.uploads == 3
    assert store.get("t.json") == b"payload"


@pytest.mark.emulator
def test_gcs_write_whose_reply_was_lost_counts_as_done(faulty_proxy: _FaultyProxy, gcs_bucket: str) -> None:
    # Given a storage path that stores the first upload but loses the reply (503 instead)
    faulty_proxy.faults[:] = ["lost"]
    client = GCSStore.make_client(project="p", api_endpoint=f"http://127.0.0.1:{faulty_proxy.server_port}")
    store = GCSStore(gcs_bucket, client=client, deadline_s=10)
    # When a result is written
    created = store.put_if_absent("t.json", b"payload")
    # Then the retry meets 412, which means the object exists: no error, and the content is ours
    assert created is False and faulty_proxy.uploads == 2
    assert store.get("t.json") == b"payload"

