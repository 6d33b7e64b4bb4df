"""The bad-input catalogue through a real worker: each kind of bad message is acked with an error
result carrying its own code, while good tasks in the same stream succeed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.errors import ErrorCode
from tests.fixtures.pipeline import WorkerProcess, new_topic, publish_raw, pull_leftovers, wait_for
from tests.fixtures.services import TEST_PROJECT
from tests.reliability.figures import record
from worker.store import GCSStore

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.reliability]

# The emulator cannot deliver more than about 4 MB in one streamed response (real Pub/Sub takes
# 10 MB messages), so this worker's limit is set below that; the 10 MB case runs over the runner
# in test_poison.py.
MAX_MESSAGE_BYTES = 1_500_000


def _env(task_id: str, kind: str = "embed", payload: dict | None = None, **extra) -> bytes:
    body = {"task_id": task_id, "kind": kind, "payload": payload or {"texts": ["a fine text"]}, **extra}
    return json.dumps(body).encode()


def _generate(task_id: str, raw_payload: str) -> bytes:
    # JSON with a literal NaN cannot be written by json.dumps(allow_nan=False); agents in other languages can.
    return f'{{"task_id": "{task_id}", "kind": "generate", "payload": {raw_payload}}}'.encode()


# (label, message bytes, attributes, where the result goes, expected code)
CATALOGUE = [
    ("not JSON", b"{this is not json", {"task_id": "bad-json"}, "adhoc/bad-json.json", ErrorCode.INVALID_JSON),
    ("not UTF-8", b"\xff\xfe\xfa task", {"task_id": "bad-utf8"}, "adhoc/bad-utf8.json", ErrorCode.INVALID_ENCODING),
    ("JSON but not an object", b'["embed", "hello"]', {"task_id": "bad-array"}, "adhoc/bad-array.json",
     ErrorCode.NOT_AN_OBJECT),
    ("unknown kind", _env("bad-kind", kind="translate"), {}, "adhoc/bad-kind.json", ErrorCode.UNKNOWN_KIND),
    ("unknown schema version", _env("bad-version", schema_version="99"), {}, "adhoc/bad-version.json",
     ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
    ("missing payload field", _env("bad-missing", payload={"dims": 8}), {}, "adhoc/bad-missing.json",
     ErrorCode.MISSING_FIELD),
    ("wrong types", _env("bad-types", payload={"texts": 42}), {}, "adhoc/bad-types.json", ErrorCode.INVALID_FIELD),
    ("empty text", _env("bad-empty", payload={"texts": ["ok", ""]}), {}, "adhoc/bad-empty.json",
     ErrorCode.EMPTY_INPUT),
    ("text over the token limit", _env("bad-long", payload={"texts": ["word " * 5000], "truncate": False}), {},
     "adhoc/bad-long.json", ErrorCode.INPUT_TOO_LONG),
    ("max_tokens over the limit", _env("bad-maxtok", kind="generate", payload={"prompt": "hi", "max_tokens": 99999}),
     {}, "adhoc/bad-maxtok.json", ErrorCode.MAX_TOKENS_OUT_OF_RANGE),
    ("negative max_tokens", _env("bad-negtok", kind="generate", payload={"prompt": "hi", "max_tokens": -5}), {},
     "adhoc/bad-negtok.json", ErrorCode.MAX_TOKENS_OUT_OF_RANGE),
    ("NaN temperature", _generate("bad-nan", '{"prompt": "hi", "temperature": NaN}'), {}, "adhoc/bad-nan.json",
     ErrorCode.INVALID_PARAMETER),
    ("negative temperature", _env("bad-temp", kind="generate", payload={"prompt": "hi", "temperature": -1}), {},
     "adhoc/bad-temp.json", ErrorCode.INVALID_PARAMETER),
    ("batch_id escaping the prefix", _env("bad-batch", batch_id="../../etc"), {}, "adhoc/bad-batch.json",
     ErrorCode.UNSAFE_IDENTIFIER),
    ("custom_id with control characters", _env("bad-custom", custom_id="line\nbreak\x00"), {},
     "adhoc/bad-custom.json", ErrorCode.UNSAFE_IDENTIFIER),
    ("too many texts", _env("bad-many", payload={"texts": ["x"] * 300}), {}, "adhoc/bad-many.json",
     ErrorCode.TOO_MANY_INPUTS),
    ("malformed response_schema", _env("bad-schema", kind="generate",
                                       payload={"prompt": "Give JSON", "response_schema": {"type": "no-such-type"}}),
     {}, "adhoc/bad-schema.json", ErrorCode.INVALID_RESPONSE_SCHEMA),
    ("dims above the model's width", _env("bad-dims", payload={"texts": ["x"], "dims": 4096}), {},
     "adhoc/bad-dims.json", ErrorCode.INVALID_PARAMETER),
    # Too large to be parsed at all: its task id travels in the attributes, as `submit` sends it.
    ("message over the size limit", _env("bad-huge", payload={"texts": ["y" * (MAX_MESSAGE_BYTES + 10)]}),
     {"task_id": "bad-huge"}, "adhoc/bad-huge.json", ErrorCode.MESSAGE_TOO_LARGE),
    ("message just under the size limit", _env("bad-near", payload={"texts": ["z " * (MAX_MESSAGE_BYTES // 2 - 100)]}),
     {}, "adhoc/bad-near.json", ErrorCode.INPUT_TOO_LONG),
]


def test_every_bad_input_gets_its_own_error_result_and_good_tasks_succeed(
        pubsub_emulator, gcs_bucket: str, gcs_client, tmp_path: Path) -> None:
    # Given a worker, good tasks, and the catalogue of bad messages interleaved with them
    store = GCSStore(gcs_bucket, "results", client=gcs_client)
    topic, subscription = new_topic(TEST_PROJECT)
    good = [(_env(f"good-{i}", payload={"texts": [f"good text {i}"], "dims": 8}), {}) for i in range(len(CATALOGUE))]
    stream = [item for pair in zip(good, [(m, a) for _, m, a, _, _ in CATALOGUE]) for item in pair]
    no_task_id = (json.dumps({"kind": "embed", "payload": {"texts": ["x"]}}).encode(), {})
    unsafe_task_id = (_env("../../escape"), {})
    worker = WorkerProcess(subscription=subscription, results=store.uri("x").removesuffix("/x"),
                           log_path=tmp_path / "w.log", extra=["--max-message-bytes", str(MAX_MESSAGE_BYTES)])
    try:
        worker.wait_ready()
        # When they are all published
        publish_raw(topic, [*stream, no_task_id, unsafe_task_id])
        names = [n for *_, n, _ in CATALOGUE] + [f"adhoc/good-{i}.json" for i in range(len(CATALOGUE))]
        missing = wait_for(store, names, timeout=240, worker=worker)
        # Then every message was acked: nothing comes back after the ack deadline
        leftovers = pull_leftovers(subscription, wait_s=12)
    finally:
        worker.stop()
    assert not missing, missing
    assert leftovers == 0
    # And each bad message has an error result with its own code, and the good ones succeeded
    seen = {}
    for label, _, _, name, code in CATALOGUE:
        result = json.loads(store.get(name))
        assert result["status"] == "error" and result["error"]["code"] == code.value, (label, result["error"])
        assert not result["error"]["retryable"] and result["error"]["message"]
        seen[label] = code.value
    assert all(json.loads(store.get(f"adhoc/good-{i}.json"))["status"] == "ok" for i in range(len(CATALOGUE)))
    # And the two messages without a usable task id are recorded under _rejected/, not lost
    rejected_records = [json.loads(store.get(n)) for n in store.list("_rejected/")]
    assert sorted(r["code"] for r in rejected_records) == ["missing_field", "unsafe_identifier"]
    assert worker.proc.returncode == 0
    record("bad_input", kinds=len(CATALOGUE) + 2, distinct_codes=len(set(seen.values()) | {"missing_field"}),
           good_tasks=len(good), good_ok=len(good), rejected_without_task_id=len(rejected_records),
           crashes=0, catalogue=seen)
