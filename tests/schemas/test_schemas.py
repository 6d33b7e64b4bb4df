from __future__ import annotations

import json

import jsonschema
import pytest

from schemas import ErrorCode, Result, ResultStatus, decode_envelope
from schemas.codec import DecodeError
from schemas.export import SCHEMA_DIR, rendered_schemas, stale_files


def test_json_schema_files_are_current() -> None:
    # Given the checked-in JSON Schema files / When compared with what the models generate
    stale = stale_files()
    # Then none differs (run `make schemas` after changing a model)
    assert stale == [], f"stale JSON Schema files: {stale}; run `make schemas`"


def test_stale_check_notices_an_edited_file(tmp_path) -> None:
    # Given a copy of the schema directory with one file changed
    for name, text in rendered_schemas().items():
        (tmp_path / name).write_text(text)
    (tmp_path / "result.schema.json").write_text("{}\n")
    # When checked / Then that file is reported
    assert stale_files(tmp_path) == ["result.schema.json"]


def test_published_envelope_schema_accepts_a_valid_task_and_rejects_a_bad_one() -> None:
    # Given the envelope JSON Schema an agent in another language would use
    schema = json.loads((SCHEMA_DIR / "envelope.schema.json").read_text())
    good = {"task_id": "t-1", "kind": "embed", "payload": {"texts": ["hello"]}}
    bad = {"task_id": "t-1", "kind": "embed", "payload": {"texts": "hello"}}
    # When validated / Then the good one passes and the bad one fails
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _task(**overrides) -> bytes:
    body = {"task_id": "t-1", "kind": "generate", "payload": {"prompt": "hi"}, **overrides}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", ErrorCode.INVALID_JSON),
        (b"\xff\xfe\x00", ErrorCode.INVALID_ENCODING),
        (b"[1, 2]", ErrorCode.NOT_AN_OBJECT),
        (_task(kind="translate"), ErrorCode.UNKNOWN_KIND),
        (_task(schema_version="2"), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
        (json.dumps({"kind": "embed", "payload": {"texts": ["a"]}}).encode(), ErrorCode.MISSING_FIELD),
        (_task(payload={}), ErrorCode.MISSING_FIELD),
        (_task(payload={"prompt": 5}), ErrorCode.INVALID_FIELD),
        (_task(payload={"prompt": ""}), ErrorCode.EMPTY_INPUT),
        (_task(payload={"prompt": "hi", "max_tokens": -3}), ErrorCode.MAX_TOKENS_OUT_OF_RANGE),
        (_task(payload={"prompt": "hi", "temperature": -0.5}), ErrorCode.INVALID_PARAMETER),
        (_task(task_id="../../etc/passwd"), ErrorCode.UNSAFE_IDENTIFIER),
        (_task(batch_id="/abs"), ErrorCode.UNSAFE_IDENTIFIER),
        (_task(payload={"prompt": "hi", "extra": 1}), ErrorCode.INVALID_FIELD),
    ],
)
def test_each_bad_message_has_its_own_code(data: bytes, code: ErrorCode) -> None:
    # Given a message that can never become a task / When decoded
    with pytest.raises(DecodeError) as caught:
        decode_envelope(data)
    # Then the error carries its own code, a message, and is not retryable
    assert caught.value.code == code
    assert caught.value.message and not caught.value.retryable


def test_decode_error_keeps_the_readable_task_id_for_the_error_result() -> None:
    # Given a message with a good task id but an unknown kind
    with pytest.raises(DecodeError) as caught:
        decode_envelope(_task(kind="nope", custom_id="mine"))
    # Then the ids are kept so an error result can be written where the caller looks
    assert (caught.value.task_id, caught.value.custom_id) == ("t-1", "mine")


def test_message_over_the_size_limit_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_envelope(b" " * 101, max_bytes=100)
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
    assert "max_bytes=100" in caught.value.message


def test_valid_envelope_round_trips_and_results_serialise() -> None:
    # Given a valid generate task / When decoded and re-encoded
    env = decode_envelope(_task(custom_id="c", batch_id="b-1"))
    again = decode_envelope(env.model_dump_json().encode())
    # Then nothing changed, and a result for it serialises with its status
    assert again == env
    result = Result(task_id=env.task_id, custom_id=env.custom_id, kind=env.kind, status=ResultStatus.OK)
    assert json.loads(result.model_dump_json())["status"] == "ok"


def _without_cache_field(schema: dict) -> dict:
    """The envelope schema as a reader from before the `cache` field saw it (unknown fields refused)."""
    older = json.loads(json.dumps(schema))
    for definition in older["$defs"].values():
        definition.get("properties", {}).pop("cache", None)
    return older


def test_an_envelope_is_written_so_a_reader_from_before_the_cache_field_takes_it() -> None:
    # Given the published envelope schema as a reader from before `cache` had it (additional properties refused)
    older = _without_cache_field(json.loads((SCHEMA_DIR / "envelope.schema.json").read_text()))
    assert "cache" in json.dumps(json.loads((SCHEMA_DIR / "envelope.schema.json").read_text()))
    # When a task that keeps the cache and one that opts out are written as publishers write them
    keeps = decode_envelope(_task(batch_id="b-1"))
    opts_out = keeps.model_copy(update={"cache": False})
    written_keeps, written_opts_out = json.loads(keeps.model_dump_json()), json.loads(opts_out.model_dump_json())
    # Then the first carries no `cache` field and the older reader takes it; the second says cache false
    # (which only a reader that knows the field can honour, so the older one refuses it rather than ignore it)
    assert "cache" not in written_keeps
    jsonschema.validate(written_keeps, older)
    assert written_opts_out["cache"] is False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(written_opts_out, older)
    # And both read back as written, with the default filled in
    assert decode_envelope(keeps.model_dump_json().encode()).cache is True
    assert decode_envelope(opts_out.model_dump_json().encode()) == opts_out
