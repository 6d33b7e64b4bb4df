"""The pull worker end to end: Google's Pub/Sub emulator, a real storage server, the real model,
and `cli.py worker` run as its own process. A worker killed mid-batch, or stopped by SIGTERM, and
the restart that finishes its tasks: tests/reliability/test_faults.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.errors import ErrorCode
from tests.fixtures.pipeline import WorkerProcess, new_topic, publish_raw, pull_leftovers, wait_for
from tests.fixtures.services import TEST_PROJECT
from worker.store import GCSStore

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def _embed(task_id: str, text: str, **extra) -> tuple[bytes, dict[str, str]]:
    body = {"task_id": task_id, "kind": "embed", "payload": {"texts": [text], "dims": 32}, **extra}
    return json.dumps(body).encode(), {}


def _generate(task_id: str, prompt: str) -> tuple[bytes, dict[str, str]]:
    body = {"task_id": task_id, "kind": "generate", "payload": {"prompt": prompt, "max_tokens": 4}}
    return json.dumps(body).encode(), {}


@pytest.fixture
def results(gcs_bucket: str, gcs_client) -> tuple[str, GCSStore]:
    return f"gs://{gcs_bucket}/results", GCSStore(gcs_bucket, "results", client=gcs_client)


def test_duplicates_and_bad_messages_settle_with_one_result_each(
        pubsub_emulator, results, tmp_path: Path, docstrings: list[str]) -> None:
    # Given good tasks, one task published twice, and four bad messages in the same stream
    location, store = results
    topic, subscription = new_topic(TEST_PROJECT)
    good = [_embed(f"good-{i}", docstrings[i]) for i in range(12)] + [_generate("gen-1", "The sky is")]
    duplicate = _embed("twice", "the same task delivered twice")
    bad = [
        (b"this is not json", {"task_id": "bad-json"}),
        (json.dumps({"task_id": "bad-kind", "kind": "translate", "payload": {}}).encode(), {}),
        (json.dumps({"task_id": "bad-missing", "kind": "embed", "payload": {}}).encode(), {}),
        (json.dumps({"schema_version": "7", "task_id": "bad-version", "kind": "embed",
                     "payload": {"texts": ["x"]}}).encode(), {}),
    ]
    worker = WorkerProcess(subscription=subscription, results=location, log_path=tmp_path / "worker.log")
    try:
        worker.wait_ready()
        # When they are all published, the duplicate twice
        publish_raw(topic, [*good[:6], duplicate, *bad, *good[6:], duplicate])
        names = [f"adhoc/{t}.json" for t in [*(f"good-{i}" for i in range(12)), "gen-1", "twice",
                                               "bad-json", "bad-kind", "bad-missing", "bad-version"]]
        missing = wait_for(store, names, timeout=180, worker=worker)
        assert not missing, missing
        # Then every message was acked: nothing is redelivered after the ack deadline
        assert pull_leftovers(subscription, wait_s=12) == 0
    finally:
        worker.stop()
    # And the good tasks succeeded beside the bad ones, each bad one with its own code
    for i in range(12):
        assert json.loads(store.get(f"adhoc/good-{i}.json"))["status"] == "ok"
    expected = {"bad-json": ErrorCode.INVALID_JSON, "bad-kind": ErrorCode.UNKNOWN_KIND,
                "bad-missing": ErrorCode.MISSING_FIELD, "bad-version": ErrorCode.UNSUPPORTED_SCHEMA_VERSION}
    for task_id, code in expected.items():
        result = json.loads(store.get(f"adhoc/{task_id}.json"))
        assert result["status"] == "error" and result["error"]["code"] == code.value, result
    # And the duplicate left exactly one object, the second delivery being recognised as done
    assert [n for n in store.list("adhoc/") if "twice" in n] == ["adhoc/twice.json"]
    outcomes = [r.get("outcome") for r in worker.records() if r.get("task_id") == "twice"]
    assert sorted(outcomes) == ["done", "duplicate"], outcomes


def test_messages_are_batched_across_messages_under_load(pubsub_emulator, results, tmp_path: Path,
                                                         docstrings: list[str]) -> None:
    # Given 60 embed tasks published at once to a running worker
    location, store = results
    topic, subscription = new_topic(TEST_PROJECT)
    worker = WorkerProcess(subscription=subscription, results=location, log_path=tmp_path / "worker.log")
    try:
        worker.wait_ready()
        publish_raw(topic, [_embed(f"load-{i}", docstrings[i % len(docstrings)]) for i in range(60)])
        missing = wait_for(store, [f"adhoc/load-{i}.json" for i in range(60)], timeout=180, worker=worker)
        assert not missing
    finally:
        worker.stop()
    # Then the engine saw batches of more than one message
    sizes = [r["requests"] for r in worker.records() if r.get("message") == "batch done"]
    assert sum(sizes) == 60 and max(sizes) > 1, sizes
