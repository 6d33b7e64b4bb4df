"""Constrained decoding on the real model: batched rows each decode JSON of the schema, finished
rows stop, a row out of tokens says so, grammars compile once, and bad schemas fail clearly."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from schemas.errors import ErrorCode, TaskError
from worker.constrained import GrammarRows, canonical_schema
from worker.decoding import Permitted
from worker.engine import Engine

ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 12},
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
        out = engine.generate(prompts, max_new_tokens=36, temperature=temperature, seed=7, response_schema=ANSWER)
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


def test_a_value_that_closes_on_the_last_token_allowed_is_whole(engine: Engine) -> None:
    # Given a schema whose value takes a few tokens, and exactly as many new tokens as it took
    schema = {"type": "boolean"}
    free = engine.generate(PROMPTS[:1], max_new_tokens=8, response_schema=schema)[0]
    assert free.finish_reason == "stop" and free.text in ("true", "false")
    # When generated again with no room left for the end-of-sequence id
    out = engine.generate(PROMPTS[:1], max_new_tokens=len(free.token_ids), response_schema=schema)[0]
    # Then the value is whole: "stop", not "length"
    assert (out.text, out.finish_reason) == (free.text, "stop")


def test_concurrent_first_requests_for_a_schema_compile_it_once(engine: Engine) -> None:
    # Given a schema nobody compiled yet, asked for by 8 threads at once
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "title": "once"}
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(lambda _: engine.check_response_schema(schema), range(8)))
    # Then all get the one compiled grammar
    assert all(c is compiled[0] for c in compiled)


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


def test_grammar_rows_allow_only_end_of_sequence_once_a_value_is_complete(engine: Engine) -> None:
    # Given the processor over two rows of a tiny schema, and the tokens of "true" then <eos>
    grammar = engine.check_response_schema({"type": "boolean"})
    rows = GrammarRows([grammar, grammar], eos_token_ids=engine.eos_ids, vocab_size=engine.grammars.vocab_size)
    value = engine.tokenizer("true", add_special_tokens=False)["input_ids"]
    eos = min(engine.eos_ids)
    ids = torch.zeros((2, 1), dtype=torch.long)
    allowed = []
    # When the rows are driven step by step as generate would, row 0 ending and then padding
    for token in [*value, eos, engine.tokenizer.pad_token_id]:
        scores = rows(ids, torch.zeros((2, rows.vocab_size)))
        allowed.append(set(torch.nonzero(scores[0] > float("-inf")).flatten().tolist()))
        ids = torch.cat([ids, torch.tensor([[token], [token]])], dim=1)
    # Then at the start any boolean's first token is allowed but not <eos>; once "true" is
    # complete only end ids are; after <eos> (and on the padding after it) exactly end ids remain
    assert value[0] in allowed[0] and eos not in allowed[0]
    assert allowed[len(value)] <= engine.eos_ids and eos in allowed[len(value)]
    assert allowed[-1] == engine.eos_ids and not any(rows.failed)


def test_greedy_constrained_rows_get_the_tokens_of_the_full_layers_masked_logits(engine: Engine,
                                                                                  docstrings: list[str]) -> None:
    # Given three graph prompts over real docstrings, under the graph task's own schema
    from worker.tasks.graph import GRAPH_SCHEMA, render_prompt
    prompts = [render_prompt(" ".join(d.split()), title=None) for d in docstrings if 150 <= len(d) <= 400][:3]
    decoder = engine.decoder
    direct, offered = decoder.allowed_rows, decoder.screened_rows + decoder.unsure_rows + decoder.full_rows
    # When decoded greedily, choosing each token from the permitted words only (Decoder.best_allowed)
    picked = engine.generate(prompts, max_new_tokens=40, response_schema=GRAPH_SCHEMA)
    counts = decoder.allowed_rows - direct, decoder.screened_rows + decoder.unsure_rows + decoder.full_rows - offered
    # and through the full output layer's logits, masked by the grammar
    engine.batched_decode = False
    try:
        reference = engine.generate(prompts, max_new_tokens=40, response_schema=GRAPH_SCHEMA)
    finally:
        engine.batched_decode = True
    # Then every row has the same tokens, and both ways of choosing were taken: rows whose grammar
    # permits few words (punctuation, the schema's keys) scored on those alone, the rest (inside
    # strings) through the greedy head
    assert [g.token_ids for g in picked] == [g.token_ids for g in reference]
    assert counts[0] > 40 and counts[1] > 10, counts
    assert decoder.allowed_rows - direct == counts[0]  # the full-logits path scores no row that way


def test_the_best_permitted_word_is_the_argmax_of_the_masked_logits(engine: Engine, docstrings: list[str]) -> None:
    # Given the final hidden states of six real prompts and their full logits
    decoder = engine.decoder
    rows = [tuple(engine.tokenize([d], truncate=True, limit=60, what="prompt")[0].ids) for d in docstrings[:6]]
    with torch.inference_mode():
        hidden = torch.cat([decoder.prefill(rows, [i]).hidden for i in range(len(rows))])
        logits = decoder.logits(hidden)
    free = logits.argmax(dim=-1)
    vocab = logits.shape[1]
    generator = torch.Generator().manual_seed(5)
    # When each row is permitted: everything; everything but its favourite (so the greedy head's
    # answer is refused and the masked full layer decides); 3,000 random words (scored alone); one
    # word; nothing
    allowed = torch.ones((6, vocab), dtype=torch.bool)
    allowed[1, free[1]] = False
    allowed[2] = torch.rand(vocab, generator=generator) < 3000 / vocab
    allowed[3] = False
    allowed[3, 77] = True
    allowed[4] = False
    allowed[5, : vocab // 2] = False
    with torch.inference_mode():
        chosen = decoder.best_allowed(hidden, Permitted.of(allowed))
    # Then each row gets what argmax over its masked logits gives (0 where nothing is permitted)
    expected = logits.masked_fill(~allowed, float("-inf")).argmax(dim=-1).tolist()
    assert chosen == expected
    assert chosen[0] == free[0] and chosen[1] != free[1] and chosen[3] == 77 and chosen[4] == 0
    assert allowed[2].sum() <= 4096  # row 2 went the direct way


@pytest.mark.parametrize("vocab", [262_144, 1_000])
def test_packed_permitted_words_count_test_and_list_as_the_bool_mask_does(vocab: int) -> None:
    # Given bool masks over a vocabulary (one not a multiple of 32): everything, nothing, every
    # 32nd word (bit 31 of each packed word, the int32 sign bit), a few words, about half
    generator = torch.Generator().manual_seed(9)
    allowed = torch.zeros((5, vocab), dtype=torch.bool)
    allowed[0] = True
    allowed[2, 31::32] = True
    allowed[3, [0, 5, 32, vocab - 1]] = True
    allowed[4] = torch.rand(vocab, generator=generator) < 0.5
    # When they are packed as xgrammar packs its masks
    permitted = Permitted.of(allowed)
    # Then the packed rows count, test, list and unpack every position's words as the bool mask does
    assert permitted.bits.dtype == torch.int32 and permitted.bits.shape == (5, -(-vocab // 32)) and len(permitted) == 5
    assert permitted.counts() == allowed.sum(dim=1).tolist()
    assert torch.equal(permitted.dense(), allowed) and torch.equal(permitted.dense([4, 2]), allowed[[4, 2]])
    for p in range(5):
        assert torch.equal(permitted.words(p), allowed[p].nonzero().flatten()), p
    assert [permitted.has(p, w) for p in range(5) for w in (0, 31, 5, vocab - 1)] == \
        [bool(allowed[p, w]) for p in range(5) for w in (0, 31, 5, vocab - 1)]
    with pytest.raises(ValueError, match="int32"):
        Permitted(permitted.bits.to(torch.int64), vocab)


def test_a_model_whose_generation_config_reads_logit_values_keeps_the_full_logits(engine: Engine) -> None:
    # Given the model's generation config asking for a repetition penalty (a processor that reads
    # each logit's value, which placeholder logits would not carry)
    from transformers import GenerationConfig

    from worker.decoding import masks_only
    assert masks_only(engine.model.lm.generation_config)
    assert not masks_only(GenerationConfig(repetition_penalty=1.3))
    assert not masks_only(GenerationConfig(no_repeat_ngram_size=3))
    config = engine.model.lm.generation_config
    direct = engine.decoder.allowed_rows
    config.repetition_penalty = 1.3
    try:
        # When a greedy constrained row is generated
        out = engine.generate(PROMPTS[:1], max_new_tokens=8, response_schema={"type": "boolean"})[0]
    finally:
        config.repetition_penalty = 1.0
    # Then it is chosen from the full logits (no row scored on its permitted words alone), still valid
    assert engine.decoder.allowed_rows == direct
    assert out.finish_reason == "stop" and out.text in ("true", "false")


def test_matcher_rows_mask_each_draft_position_as_the_grammar_stands_after_the_drafts_before_it(engine: Engine) -> None:
    from worker.constrained import MatcherRows
    # Given a row under a small schema, the tokens of a value it permits (the model's own answer),
    # and a reference matcher
    grammar = engine.check_response_schema(ANSWER)
    value = engine.generate(PROMPTS[:1], max_new_tokens=36, response_schema=ANSWER)[0].token_ids
    assert len(value) > 6
    rows = MatcherRows({5: grammar}, eos_token_ids=engine.eos_ids, vocab_size=engine.grammars.vocab_size)
    reference = GrammarRows([grammar], eos_token_ids=engine.eos_ids, vocab_size=engine.grammars.vocab_size)

    def reference_mask(prefix: list[int]) -> torch.Tensor:
        ref = GrammarRows([grammar], eos_token_ids=engine.eos_ids, vocab_size=reference.vocab_size)
        for token in prefix:
            assert ref.matchers[0].accept_token(token)
        return ref(torch.zeros((1, 1), dtype=torch.long), torch.zeros((1, ref.vocab_size)))[0] > float("-inf")

    # When it is asked for its masks with the value's first four tokens as drafts, twice
    packed = rows.allowed([(5, value[:4])])
    first, again = packed.dense(), rows.allowed([(5, value[:4])]).dense()
    # Then position j permits what the grammar permits after the first j drafts, and asking
    # changed nothing (the matcher rolled back)
    assert first.shape == (5, reference.vocab_size) and torch.equal(first, again)
    for j in range(5):
        assert torch.equal(first[j], reference_mask(value[:j])), j
        assert packed.counts()[j] == int(first[j].sum()) and torch.equal(packed.words(j), first[j].nonzero().flatten())
    # And a draft the grammar refuses ends the row's permitted positions there, and is trimmed
    refused = engine.tokenizer("[", add_special_tokens=False)["input_ids"][0]
    masks = rows.allowed([(5, [value[0], refused, value[2]])]).dense()
    assert masks[0].any() and masks[1].any() and not masks[2].any() and not masks[3].any()
    assert rows.permitted(5, [value[0], refused, value[2]]) == [value[0]]
    assert rows.permitted(5, value[:6]) == value[:6]
    # And once the row has taken the whole value only end-of-sequence is permitted; after it, still only that
    for token in value:
        rows.accept(5, token)
    assert rows.complete(5) and set(rows.allowed([(5, [])]).words(0).tolist()) <= engine.eos_ids
    rows.accept(5, min(engine.eos_ids))
    assert set(rows.allowed([(5, [])]).words(0).tolist()) == engine.eos_ids and not rows.failed


def test_greedy_constrained_rows_go_through_the_merged_decoder_with_drafts_and_get_generates_tokens(
        engine: Engine, docstrings: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine import Tokenized
    from worker.tasks.graph import GRAPH_SCHEMA, render_prompt
    # Given five graph prompts over real docstrings, under the graph task's own schema, prefilled
    # one at a time, and a key/value budget that holds two of them at a time
    prompts = [render_prompt(" ".join(d.split()), title=None) for d in docstrings if 150 <= len(d) <= 400][3:8]
    items = engine.tokenize(prompts, truncate=False, what="prompt")
    decoder = engine.decoder
    joined: list[int] = []
    admit = decoder._admit

    def admitting(rows, joining, *args, **kwargs):
        joined.append(sum(map(len, joining)))
        return admit(rows, joining, *args, **kwargs)

    monkeypatch.setattr(decoder, "_admit", admitting)
    monkeypatch.setattr(engine, "token_budget", max(len(it.ids) for it in items))
    monkeypatch.setattr(engine, "decode_tokens", 2 * (max(len(it.ids) for it in items) + 2 * 160 + decoder.draft_tokens))
    assert engine.plan_generate(items, max_new_tokens=160, merged=engine.merges(constrained=True, temperature=0.0)) \
        == [(sorted(range(5), key=lambda i: len(items[i].ids), reverse=True), True)]
    # When decoded greedily through the merged decoder
    before = decoder.drafted, decoder.accepted, decoder.steps
    merged = engine.generate_tokenized(items, max_new_tokens=160, response_schema=GRAPH_SCHEMA)
    drafted, accepted, steps = (after - b for after, b in zip((decoder.drafted, decoder.accepted, decoder.steps), before))
    # and through `generate` batches (each row's best permitted word, `best_allowed`, as before)
    monkeypatch.setattr(engine, "merges", lambda **_: False)
    reference = engine.generate_tokenized([Tokenized(ids=it.ids, truncated=False) for it in items], max_new_tokens=160,
                                          response_schema=GRAPH_SCHEMA)
    # Then every row has the same tokens and finish, its value JSON of the schema where it closed,
    for m, r in zip(merged, reference):
        assert (m.token_ids, m.finish_reason) == (r.token_ids, r.finish_reason)
        if m.finish_reason == "stop":
            jsonschema.validate(json.loads(m.text), GRAPH_SCHEMA)
    assert sum(m.finish_reason == "stop" for m in merged) >= 3, [(len(m.token_ids), m.finish_reason) for m in merged]
    # rows joined the running batch as others ended, and drafts the grammar took saved steps
    assert max(joined) > 0
    assert accepted > 0 and drafted >= accepted and steps < sum(len(m.token_ids) for m in merged) / 2
