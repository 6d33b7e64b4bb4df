from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from schemas import EmbedOutput, ErrorCode, ErrorInfo, GenerateOutput, Result, TaskError
from schemas.codec import PUBSUB_MAX_MESSAGE_BYTES
from schemas.envelope import SAFE_ID_PATTERN
from worker.batches import (
    BatchFile,
    BatchStatus,
    batch_status,
    collect_results,
    new_batch_id,
    publish_batch,
    read_batch_file,
    record_batch,
    wait_for_batch,
)
from worker.store import LocalStore

BATCH = "b-20261127T031500Z-3f9a"


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _openai(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _derived(custom_id_or_line: str | int, batch_id: str = BATCH) -> str:
    return "t-" + hashlib.sha256(f"{batch_id}\n{custom_id_or_line}".encode()).hexdigest()[:24]


MIXED = [
    {"kind": "embed", "payload": {"texts": ["native, no ids"]}},
    {"kind": "generate", "task_id": "mine-1", "custom_id": "n-2", "payload": {"prompt": "hi"}},
    "",
    _openai("emb-1", "/v1/embeddings", {"input": ["a", "b"]}),
    _openai("cmp 1/with spaces", "/v1/completions", {"prompt": "Once", "max_tokens": 5}),
    _openai("chat-1", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
]


def _batch(tmp_path: Path, rows: list[Any] = MIXED, *, batch_id: str = BATCH) -> BatchFile:
    batch = read_batch_file(_write_jsonl(tmp_path / "in.jsonl", rows), batch_id=batch_id)
    assert batch.invalid == []
    return batch


def _put_result(store: LocalStore, line_task_id: str, *, ok: bool = True, custom_id: str | None = None,
                kind: str = "generate") -> None:
    """Write a result object the way the worker does: create-only, under {batch_id}/{task_id}.json."""
    if ok and kind == "embed":
        output: Any = EmbedOutput(embeddings=[[0.6, 0.8]], dims=2, input_tokens=[2], truncated=[False])
    elif ok:
        output = GenerateOutput(text="out", finish_reason="stop", prompt_tokens=3, completion_tokens=1)
    else:
        output = None
    error = None if ok else ErrorInfo(code=ErrorCode.INPUT_TOO_LONG, message="too long")
    result = Result(task_id=line_task_id, custom_id=custom_id, batch_id=BATCH, kind=kind,
                    status="ok" if ok else "error", output=output, error=error, model="gemma-3-270m")
    assert store.put_if_absent(f"{BATCH}/{line_task_id}.json", result.model_dump_json().encode())


def test_mixed_file_reads_in_order_with_stable_task_ids(tmp_path: Path) -> None:
    # Given a file of two native lines, a blank line and one line per OpenAI url
    path = _write_jsonl(tmp_path / "in.jsonl", MIXED)
    # When read twice under the same batch id
    first = read_batch_file(path, batch_id=BATCH)
    again = read_batch_file(path, batch_id=BATCH)
    # Then every line is valid, in input order, with its format and a stable task id
    assert first.invalid == []
    assert [(ln.line_no, ln.fmt) for ln in first.lines] == [
        (1, "native"), (2, "native"), (4, "embeddings"), (5, "completions"), (6, "chat.completions")]
    ids = [ln.envelope.task_id for ln in first.lines]
    assert ids == [_derived(1), "mine-1", "emb-1", _derived("cmp 1/with spaces"), "chat-1"]
    assert ids == [ln.envelope.task_id for ln in again.lines]
    assert {ln.envelope.batch_id for ln in first.lines} == {BATCH}
    assert [ln.envelope.kind for ln in first.lines] == ["embed", "generate", "embed", "generate", "generate"]


def test_derived_ids_depend_on_the_batch_id(tmp_path: Path) -> None:
    # Given a line whose custom_id cannot be a task id / When read under two batch ids
    rows = [_openai("has space", "/v1/embeddings", {"input": "x"})]
    a = read_batch_file(_write_jsonl(tmp_path / "a.jsonl", rows), batch_id="b-a").lines[0].envelope.task_id
    b = read_batch_file(_write_jsonl(tmp_path / "b.jsonl", rows), batch_id="b-b").lines[0].envelope.task_id
    # Then the derived ids differ
    assert a == _derived("has space", "b-a") and b == _derived("has space", "b-b") and a != b


def test_three_bad_lines_are_all_reported_with_line_numbers_and_codes(tmp_path: Path) -> None:
    # Given a file with a bad JSON line, a line with neither kind nor url, and a duplicate custom_id
    rows = [
        _openai("c-1", "/v1/embeddings", {"input": "ok"}),
        "{not json",
        {"custom_id": "c-2", "body": {}},
        _openai("c-3", "/v1/completions", {"prompt": "ok"}),
        _openai("c-1", "/v1/embeddings", {"input": "again"}),
    ]
    # When read
    batch = read_batch_file(_write_jsonl(tmp_path / "in.jsonl", rows), batch_id=BATCH)
    # Then all three are reported, in order, and the good lines are still read
    assert [(bad.line_no, bad.code) for bad in batch.invalid] == [
        (2, ErrorCode.INVALID_JSON), (3, ErrorCode.MISSING_FIELD), (5, ErrorCode.DUPLICATE_ID)]
    assert "line 1" in batch.invalid[2].message and "'c-1'" in batch.invalid[2].message
    assert [ln.line_no for ln in batch.lines] == [1, 4]


@pytest.mark.parametrize(("row", "code", "needle"), [
    ("[1, 2]", ErrorCode.NOT_AN_OBJECT, "JSON object"),
    ({"kind": "embed", "url": "/v1/embeddings"}, ErrorCode.INVALID_FIELD, "both"),
    ({"kind": "embed", "batch_id": "b-other", "payload": {"texts": ["x"]}}, ErrorCode.INVALID_FIELD, "b-other"),
    ({"kind": "embed", "payload": {"texts": []}}, ErrorCode.EMPTY_INPUT, "texts"),
    ({"kind": "embed", "task_id": "../x", "payload": {"texts": ["x"]}}, ErrorCode.UNSAFE_IDENTIFIER, "task_id"),
    (_openai("c", "/v1/completions", {"prompt": ["a"]}), ErrorCode.INVALID_FIELD, "single string"),
    (_openai("c", "/v1/embeddings", {"input": "x" * (PUBSUB_MAX_MESSAGE_BYTES + 1)}),
     ErrorCode.MESSAGE_TOO_LARGE, str(PUBSUB_MAX_MESSAGE_BYTES)),
])
def test_each_kind_of_bad_line_has_its_code(tmp_path: Path, row: Any, code: ErrorCode, needle: str) -> None:
    # Given a file whose second line is bad in one way
    rows = [_openai("good", "/v1/embeddings", {"input": "x"}), row]
    # When read
    batch = read_batch_file(_write_jsonl(tmp_path / "in.jsonl", rows), batch_id=BATCH)
    # Then line 2 is reported with the matching code and a message naming the problem
    assert [(bad.line_no, bad.code) for bad in batch.invalid] == [(2, code)]
    assert needle in batch.invalid[0].message


def test_duplicate_task_id_is_reported(tmp_path: Path) -> None:
    # Given a native line whose explicit task id equals another line's custom_id-derived task id
    rows = [_openai("same", "/v1/embeddings", {"input": "x"}),
            {"kind": "embed", "task_id": "same", "payload": {"texts": ["y"]}}]
    # When read / Then the second is a duplicate task id
    batch = read_batch_file(_write_jsonl(tmp_path / "in.jsonl", rows), batch_id=BATCH)
    assert [(b.line_no, b.code) for b in batch.invalid] == [(2, ErrorCode.DUPLICATE_ID)]
    assert "duplicate task_id" in batch.invalid[0].message


def test_unsafe_batch_id_is_refused(tmp_path: Path) -> None:
    # Given a batch id with a path separator / When a file is read under it / Then it is refused up front
    with pytest.raises(TaskError) as caught:
        read_batch_file(_write_jsonl(tmp_path / "in.jsonl", MIXED), batch_id="a/b")
    assert caught.value.code == ErrorCode.UNSAFE_IDENTIFIER


def test_new_batch_id_is_utc_time_and_four_hex() -> None:
    # Given / When two ids are made
    a, b = new_batch_id(), new_batch_id()
    # Then each is UTC time plus four hex digits, and a safe id
    for made in (a, b):
        assert re.fullmatch(r"b-\d{8}T\d{6}Z-[0-9a-f]{4}", made), made
        assert re.fullmatch(SAFE_ID_PATTERN, made)


def test_record_then_resubmit_then_different_tasks(tmp_path: Path) -> None:
    # Given a batch recorded once
    store, batch = LocalStore(tmp_path / "results"), _batch(tmp_path)
    manifest = record_batch(store, batch, batch_id=BATCH, model="gemma-3-270m", source_name="in.jsonl")
    # Then the manifest lists the tasks in input order with their formats
    stored = json.loads(store.get(f"{BATCH}/_batch.json"))
    assert stored == manifest and stored["count"] == 5 and stored["source"] == "in.jsonl"
    assert stored["tasks"][2] == {"task_id": "emb-1", "custom_id": "emb-1", "fmt": "embeddings"}
    # When the same file is recorded again / Then the first manifest is reused
    again = record_batch(store, _batch(tmp_path), batch_id=BATCH, model="gemma-3-270m", source_name="in.jsonl")
    assert again["created_at"] == manifest["created_at"]
    # When a different file is recorded under the same batch id / Then it is refused, naming the batch
    other = _batch(tmp_path, MIXED[:2])
    with pytest.raises(TaskError, match=BATCH) as caught:
        record_batch(store, other, batch_id=BATCH, model=None, source_name="other.jsonl")
    assert "new batch id" in caught.value.message


def test_status_counts_ok_error_and_pending(tmp_path: Path) -> None:
    # Given a recorded batch of five with two ok results and one error result written
    store, batch = LocalStore(tmp_path / "results"), _batch(tmp_path)
    record_batch(store, batch, batch_id=BATCH, model=None, source_name="in.jsonl")
    ids = [ln.envelope.task_id for ln in batch.lines]
    _put_result(store, ids[0], kind="embed")
    _put_result(store, ids[3])
    _put_result(store, ids[1], ok=False)
    # When asked for status
    status = batch_status(store, BATCH)
    # Then the counts and times reflect what was written
    assert (status.total, status.ok, status.error, status.pending) == (5, 2, 1, 2)
    assert not status.done
    assert status.created_at <= status.first_result_at <= status.last_result_at
    assert status.rate_per_s is not None and status.rate_per_s > 0


def test_status_of_unknown_batch_names_it_and_the_location(tmp_path: Path) -> None:
    # Given an empty results location / When asked about a batch / Then the error names both
    store = LocalStore(tmp_path / "results")
    with pytest.raises(TaskError) as caught:
        batch_status(store, "b-nope")
    assert caught.value.code == ErrorCode.UNKNOWN_BATCH
    assert "b-nope" in caught.value.message and str(tmp_path / "results") in caught.value.message


def test_collect_writes_input_order_and_splits_errors(tmp_path: Path) -> None:
    # Given a fully finished batch whose results were written in reverse order, one of them an error
    store, batch = LocalStore(tmp_path / "results"), _batch(tmp_path)
    record_batch(store, batch, batch_id=BATCH, model=None, source_name="in.jsonl")
    for ln in reversed(batch.lines):
        _put_result(store, ln.envelope.task_id, ok=ln.envelope.task_id != "mine-1", kind=ln.envelope.kind,
                    custom_id=ln.envelope.custom_id)
    # When collected without and then with an errors file
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    summary = collect_results(store, BATCH, out=tmp_path / "all.jsonl", errors=None)
    split = collect_results(store, BATCH, out=out, errors=errors)
    # Then all lines come in input order, each in its format; the split moves the error line aside
    all_lines = [json.loads(x) for x in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [x["id"] for x in all_lines] == [f"batch_req_{ln.envelope.task_id}" for ln in batch.lines]
    assert (summary.ok, summary.error, summary.pending) == (4, 1, 0)
    assert all_lines[1]["error"]["code"] == "input_too_long"
    assert all_lines[2]["response"]["body"]["object"] == "list"
    assert all_lines[3]["response"]["body"]["object"] == "text_completion"
    assert all_lines[4]["response"]["body"]["object"] == "chat.completion"
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == [None, "emb-1", "cmp 1/with spaces",
                                                                                 "chat-1"]
    assert [json.loads(x)["custom_id"] for x in errors.read_text().splitlines()] == ["n-2"]
    assert (split.ok, split.error, split.errors) == (4, 1, errors)


def test_collect_refuses_pending_unless_partial(tmp_path: Path) -> None:
    # Given a batch of five with two results written
    store, batch = LocalStore(tmp_path / "results"), _batch(tmp_path)
    record_batch(store, batch, batch_id=BATCH, model=None, source_name="in.jsonl")
    _put_result(store, "chat-1")
    _put_result(store, "mine-1")
    out = tmp_path / "out.jsonl"
    # When collected without partial / Then it refuses, saying how many are pending and what to do, writing nothing
    with pytest.raises(TaskError) as caught:
        collect_results(store, BATCH, out=out, errors=None)
    assert caught.value.code == ErrorCode.RESULTS_PENDING
    assert "3 of 5" in caught.value.message and "--wait" in caught.value.message
    assert "--partial" in caught.value.message and caught.value.retryable
    assert not out.exists() and list(tmp_path.glob(".out.jsonl*")) == []
    # When collected with partial / Then the done tasks are written in input order
    summary = collect_results(store, BATCH, out=out, errors=None, partial=True)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["batch_req_mine-1", "batch_req_chat-1"]
    assert (summary.ok, summary.error, summary.pending) == (2, 0, 3)


def test_wait_returns_when_the_last_result_lands(tmp_path: Path) -> None:
    # Given a recorded batch whose results a "worker" thread writes over a short while
    store, batch = LocalStore(tmp_path / "results"), _batch(tmp_path)
    record_batch(store, batch, batch_id=BATCH, model=None, source_name="in.jsonl")

    def worker() -> None:
        for ln in batch.lines:
            time.sleep(0.05)
            _put_result(store, ln.envelope.task_id, kind=ln.envelope.kind)

    seen: list[BatchStatus] = []
    thread = threading.Thread(target=worker)
    thread.start()
    # When waited on
    status = wait_for_batch(store, BATCH, poll_s=0.02, timeout_s=30, on_progress=seen.append)
    thread.join()
    # Then it returns done with every result counted, after reporting progress along the way
    assert status.done and (status.ok, status.error) == (5, 0)
    assert len(seen) >= 2 and seen[0].pending > 0
    assert [s.ok + s.error for s in seen] == sorted(s.ok + s.error for s in seen)


def test_wait_gives_up_after_timeout_with_the_last_status(tmp_path: Path) -> None:
    # Given a recorded batch nobody works on / When waited on briefly
    store, batch = LocalStore(tmp_path / "results"), _batch(tmp_path)
    record_batch(store, batch, batch_id=BATCH, model=None, source_name="in.jsonl")
    began = time.monotonic()
    status = wait_for_batch(store, BATCH, poll_s=0.05, timeout_s=0.2, on_progress=lambda s: None)
    # Then it returns within about the timeout, still pending
    assert time.monotonic() - began < 5
    assert not status.done and status.pending == 5


@pytest.mark.emulator
def test_publish_batch_delivers_every_task_with_attributes(pubsub_emulator, tmp_path: Path) -> None:
    from google.cloud import pubsub_v1

    from worker.devservices import ensure_subscription, ensure_topic

    # Given a topic with a pull subscription and a batch of five tasks
    project = pubsub_emulator.project
    topic = ensure_topic(project, "batches-test")
    subscription = ensure_subscription(project, "batches-test", "batches-test-sub")
    batch = _batch(tmp_path)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    progress: list[int] = []
    try:
        # When published
        count = publish_batch(publisher, topic, batch.lines, on_published=progress.append)
        # Then a synchronous pull gets every envelope back with its attributes
        received: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while len(received) < count and time.monotonic() < deadline:
            response = subscriber.pull(subscription=subscription, max_messages=10, timeout=10)
            for msg in response.received_messages:
                received[msg.message.attributes["task_id"]] = msg.message
            if response.received_messages:
                subscriber.acknowledge(subscription=subscription,
                                       ack_ids=[m.ack_id for m in response.received_messages])
    finally:
        publisher.transport.close()
        subscriber.close()
    assert count == 5 and progress == [1, 2, 3, 4, 5]
    for ln in batch.lines:
        message = received[ln.envelope.task_id]
        assert dict(message.attributes) == {"task_id": ln.envelope.task_id, "kind": ln.envelope.kind,
                                            "batch_id": BATCH}
        assert json.loads(message.data) == json.loads(ln.envelope.model_dump_json())
