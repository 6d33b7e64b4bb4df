"""Constrained decoding on the real model: batched rows each decode JSON of the schema, finished
rows stop, a row out of tokens says so, grammars compile once, and bad schemas fail clearly."""
from __future__ import annotations

import json

import jsonschema
import pytest

from schemas.errors import ErrorCode, TaskError
from worker.constrained import canonical_schema
from worker.engine import Engine

ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 16},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["fact", "guess", "other"]}, "maxItems": 2},
    },
    "required": ["answer", "confidence", "tags"],
    "additionalProperties": False,
}
PROMPTS = [
    "Question: What is the capital of France?\nJSON answer: ",
    "Question: Which module in Python's standard library reads and writes JSON?\nJSON answer: ",
    "Q: 2 + 2?\nJSON: ",
]


def test_every_row_of_a_batch_decodes_json_of_the_schema(engine: Engine) -> None:
    # Given prompts of different lengths in one batch, greedy and sampled
    for temperature, prompts in ((0.0, PROMPTS), (0.8, PROMPTS[1:])):
        # When generated under the schema
        out = engine.generate(prompts, max_new_tokens=40, temperature=temperature, seed=7, response_schema=ANSWER)
        # Then each row stopped on its own and its text is JSON that validates
        for gen in out:
            assert gen.finish_reason == "stop", gen
            jsonschema.validate(json.loads(gen.text), ANSWER)
            assert gen.token_ids[-1] not in engine.eos_ids  # the end token itself is not part of the text


def test_a_row_out_of_tokens_before_the_json_closes_reports_length(engine: Engine) -> None:
    # Given a budget far too small for the schema / When generated
    out = engine.generate(PROMPTS[:2], max_new_tokens=4, response_schema=ANSWER)
    # Then the rows say "length" rather than pretending the prefix is a value
    assert [g.finish_reason for g in out] == ["length", "length"]
    assert all(len(g.token_ids) == 4 for g in out)


def test_equal_schemas_share_one_compiled_grammar(engine: Engine) -> None:
    # Given the same schema as a dict and as differently spaced JSON text
    first = engine.check_response_schema(ANSWER)
    again = engine.check_response_schema(json.dumps(ANSWER, indent=4))
    # Then both map to one canonical key and one compiled object
    assert again is first and first.key == canonical_schema(ANSWER)
    # And key order is kept, since it decides the order the grammar writes properties in
    reordered = {"properties": ANSWER["properties"], "type": "object"}
    assert canonical_schema(reordered) != canonical_schema({"type": "object", "properties": ANSWER["properties"]})


@pytest.mark.parametrize(("schema", "says"), [
    ({"type": "objekt"}, "not a valid JSON Schema"),
    ({"type": "object", "required": "name"}, "not a valid JSON Schema"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "cannot be turned into a grammar"),
    ({"type": "string", "pattern": "(unclosed"}, "not a valid JSON Schema"),
    ({"type": "string", "pattern": "(?<=a)b"}, "cannot be turned into a grammar"),
    ("{not json", "not valid JSON"),
    (["type", "object"], "must be a JSON Schema object"),
])
def test_a_malformed_schema_is_a_clear_error(engine: Engine, schema: object, says: str) -> None:
    # Given a malformed schema / When checked
    with pytest.raises(TaskError) as caught:
        engine.check_response_schema(schema)  # type: ignore[arg-type]
    # Then it is invalid_response_schema, not retryable, with a message naming the problem
    assert caught.value.code == ErrorCode.INVALID_RESPONSE_SCHEMA and not caught.value.retryable
    assert says in caught.value.message


def test_stop_strings_cannot_cut_constrained_output(engine: Engine) -> None:
    # Given a schema and a stop string / When generation is asked for both
    with pytest.raises(TaskError) as caught:
        engine.generate(PROMPTS[:1], max_new_tokens=8, stop=["}"], response_schema=ANSWER)
    # Then it is refused before any decoding
    assert caught.value.code == ErrorCode.INVALID_PARAMETER
