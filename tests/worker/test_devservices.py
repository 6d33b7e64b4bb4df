"""worker/devservices.py: the real emulator and storage server, started, used and stopped."""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.cloud import pubsub_v1

from worker.devservices import (
    PubSubEmulator,
    ServiceError,
    StorageServer,
    dev_down,
    dev_status,
    dev_up,
    ensure_bucket,
    ensure_subscription,
    ensure_topic,
)

if TYPE_CHECKING:
    from google.cloud import storage

pytestmark = pytest.mark.emulator


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _process_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_services_start_answer_and_stop_cleanly() -> None:
    # Given both servers started as context managers
    with PubSubEmulator(project="p") as pubsub, StorageServer() as gcs:
        pids, ports = [pubsub.pid, gcs.pid], [pubsub.port, gcs.port]
        # When they are probed
        # Then both answer on 127.0.0.1 and expose the env their clients need
        assert PubSubEmulator.probe(pubsub.port) and StorageServer.probe(gcs.port)  # type: ignore[arg-type]
        assert pubsub.env == {"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{pubsub.port}", "PUBSUB_PROJECT_ID": "p"}
        assert gcs.env == {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs.port}"}
        print(f"startup: pubsub {pubsub.startup_s:.2f}s, storage {gcs.startup_s:.2f}s")
    # And after the block the processes are gone, the ports closed, and stopping again is harmless
    assert all(_process_gone(pid) for pid in pids)  # type: ignore[arg-type]
    assert not any(_port_open(port) for port in ports)  # type: ignore[arg-type]
    pubsub.stop()
    gcs.stop()
    with pytest.raises(ServiceError, match="not_started"):
        _ = gcs.env


def test_a_server_that_cannot_start_raises_and_leaves_nothing_running() -> None:
    # Given a port that something else already listens on
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = StorageServer(port=squatter.getsockname()[1])
        # When the storage server is started on it
        with pytest.raises(ServiceError) as caught:
            server.start()
    # Then the error says it exited and shows its log, and no process is left
    assert caught.value.code == "service_exited" and "address already in use" in caught.value.message
    assert server.pid is None


def test_dev_up_reuses_a_live_pair_and_dev_down_stops_it(tmp_path: Path) -> None:
    # Given services brought up detached, as `dev up` does
    try:
        env = dev_up(tmp_path, project="demo")
        status = dev_status(tmp_path)
        assert status is not None and all(s["healthy"] for s in status["services"].values())
        pids = [s["pid"] for s in status["services"].values()]
        ports = [s["port"] for s in status["services"].values()]
        assert env["PUBSUB_PROJECT_ID"] == "demo" and env["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
        # When `dev up` runs again
        # Then it returns the same env and starts no second pair
        assert dev_up(tmp_path, project="demo") == env
        assert [s["pid"] for s in dev_status(tmp_path)["services"].values()] == pids  # type: ignore[index]
    finally:
        # When `dev down` runs
        stopped = dev_down(tmp_path)
    # Then the processes are gone, the ports closed, and the state forgotten
    assert stopped is True
    assert all(_process_gone(pid) for pid in pids)
    assert not any(_port_open(port) for port in ports)
    assert dev_status(tmp_path) is None and dev_down(tmp_path) is False


def test_topic_and_subscription_helpers_are_idempotent_and_deliver(pubsub_emulator: PubSubEmulator) -> None:
    # Given a topic and a subscription each ensured twice
    project = pubsub_emulator.project
    topic = ensure_topic(project, "tasks")
    assert ensure_topic(project, "tasks") == topic
    sub = ensure_subscription(project, "tasks", "tasks-worker", ack_deadline_seconds=30)
    assert ensure_subscription(project, "tasks", "tasks-worker", ack_deadline_seconds=30) == sub
    # When a message is published
    publisher = pubsub_v1.PublisherClient()
    publisher.publish(topic, b'{"task_id": "t1"}', kind="embed").result(timeout=10)
    # Then it is pulled back with its data and attributes
    with pubsub_v1.SubscriberClient() as subscriber:
        assert subscriber.get_subscription(subscription=sub).ack_deadline_seconds == 30
        received = []
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            received = subscriber.pull(subscription=sub, max_messages=10, timeout=5).received_messages
        assert [(m.message.data, m.message.attributes["kind"]) for m in received] == [(b'{"task_id": "t1"}', "embed")]
        subscriber.acknowledge(subscription=sub, ack_ids=[m.ack_id for m in received])
    publisher.stop()


def test_subscription_helper_refuses_a_wrong_or_missing_topic(pubsub_emulator: PubSubEmulator) -> None:
    # Given a subscription on one topic
    project = pubsub_emulator.project
    ensure_topic(project, "first")
    ensure_topic(project, "second")
    ensure_subscription(project, "first", "shared-name")
    # When the same subscription name is ensured on another topic, or on a topic that does not exist
    # Then each is a clear error, not a silent success
    with pytest.raises(ServiceError, match="subscription_topic_mismatch"):
        ensure_subscription(project, "second", "shared-name")
    with pytest.raises(ServiceError, match="topic_not_found"):
        ensure_subscription(project, "no-such-topic", "orphan")


def test_ensure_bucket_creates_once(gcs_client: storage.Client) -> None:
    # Given a bucket name that does not exist yet
    assert gcs_client.lookup_bucket("made-by-ensure") is None
    # When it is ensured twice
    first = ensure_bucket(gcs_client, "made-by-ensure")
    second = ensure_bucket(gcs_client, "made-by-ensure")
    # Then both return it and it exists
    assert first.name == second.name == "made-by-ensure"
    assert gcs_client.lookup_bucket("made-by-ensure") is not None
