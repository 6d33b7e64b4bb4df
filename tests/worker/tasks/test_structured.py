"""`graph`, `code` and schema-constrained `generate` tasks on the real model, run the way the worker
runs them (runner → batcher → engine → store): every result parses and validates, every edge joins
two nodes, long documents are chunked and merged, and a malformed schema is a clear error result."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from schemas.errors import ErrorCode
from schemas.graph import KnowledgeGraph, normalise_label
from schemas.result import CodeOutput, GenerateOutput, GraphOutput, ResultStatus
from worker.batcher import BatchStats
from worker.corpus import stdlib_docstrings, stdlib_files
from worker.tasks import TaskContext
from tests.worker.tasks.support import assert_mermaid_matches, published, run_envelopes

GRAPH_DOCS = 10
CODE_FILES = 6
MAX_TOKENS = 256  # enough for every chunk JSON of this corpus to close; the defaults are larger


def corpus_sources(n: int) -> list[tuple[str, str]]:
    """(file name, source) of real standard-library files: whole small files, heads of larger ones."""
    out = []
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) < 400:
            continue
        if len(text) > 1200:  # cut at a line end so what the model sees is still well-formed lines
            text = text[: text.rfind("\n", 0, 1200) + 1]
        out.append((path.name, text))
    step = max(1, len(out) // n)
    return out[::step][:n]


def test_a_corpus_of_graph_and_code_tasks_all_parse_and_validate(
        ctx: TaskContext, tmp_path: Path, batch_log: list[BatchStats]) -> None:
    # Given real documents: standard-library docstrings for `graph` (one asking for node
    # embeddings) and standard-library source files for `code` (half without a file name)
    docs = stdlib_docstrings(GRAPH_DOCS, min_chars=120, max_chars=400)
    sources = corpus_sources(CODE_FILES)
    envelopes = [{"task_id": f"g-{i}", "kind": "graph",
                  "payload": {"text": d, "max_tokens": MAX_TOKENS, "embed_nodes": i == 0}} for i, d in enumerate(docs)]
    envelopes += [{"task_id": f"c-{i}", "kind": "code", "payload": {
        "source": src, "max_tokens": MAX_TOKENS, **({"filename": name} if i % 2 == 0 else {})}}
        for i, (name, src) in enumerate(sources)]
    assert len(envelopes) == GRAPH_DOCS + CODE_FILES
    calls_before = len(batch_log)
    # When all are submitted at once and run
    results = run_envelopes(ctx, tmp_path, envelopes)
    # Then every task succeeded and its output validates against the published schemas
    failures = [(r.task_id, r.error) for r in results if r.status is not ResultStatus.OK]
    assert failures == []
    graph_schema, code_schema = published("knowledge_graph.schema.json"), published("code_analysis.schema.json")
    for result in results[:GRAPH_DOCS]:
        out = result.output
        assert isinstance(out, GraphOutput) and out.chunks == 1
        jsonschema.validate(out.graph.model_dump(mode="json"), graph_schema)
        KnowledgeGraph.model_validate(out.graph.model_dump())  # every edge joins two of its nodes
        ids = {n.id for n in out.graph.nodes}
        assert all(e.source in ids and e.target in ids and e.source != e.target for e in out.graph.edges)
        labels = [normalise_label(n.label) for n in out.graph.nodes]
        assert len(labels) == len(set(labels)), f"duplicate node labels in {result.task_id}: {labels}"
        assert_mermaid_matches(out.graph, out.mermaid)
    first = results[0].output
    assert first.node_embeddings is not None and len(first.node_embeddings) == len(first.graph.nodes)
    assert all(len(v) == ctx.engine.width for v in first.node_embeddings)
    for i, result in enumerate(results[GRAPH_DOCS:]):
        out = result.output
        assert isinstance(out, CodeOutput)
        jsonschema.validate(out.analysis.model_dump(mode="json"), code_schema)
        if i % 2 == 0:
            assert (out.analysis.language, out.language_from) == ("python", "filename")
    # And the tasks shared engine calls rather than running one by one
    calls = batch_log[calls_before:]
    assert max(c.requests for c in calls if c.kind == "generate") > 1
    print("corpus: longest answer (tokens) graph", max(r.output.completion_tokens for r in results[:GRAPH_DOCS]),
          "code", max(r.output.completion_tokens for r in results[GRAPH_DOCS:]),
          "| calls", [(c.kind, c.requests, c.tokens, round(c.run_ms / 1000, 1)) for c in calls])


def test_long_documents_are_chunked_and_merged(ctx: TaskContext, tmp_path: Path) -> None:
    # Given a real document over the model's input limit (the docstrings of one standard-library
    # module, joined), and a whole standard-library source file asked for in small chunks
    limit = ctx.engine.max_input_tokens
    text = _long_document(ctx, min_tokens=limit + 200)
    name, source = _whole_file(min_chars=3000, max_chars=5000)
    # When they go through `graph` (default chunk size) and `code` tasks at the default max_tokens
    result, code = run_envelopes(ctx, tmp_path, [
        {"task_id": "long-graph", "kind": "graph", "payload": {"text": text}},
        {"task_id": "long-code", "kind": "code", "payload": {"source": source, "filename": name, "chunk_tokens": 400}}])
    # Then the source's chunk analyses merged into one valid analysis
    assert code.status is ResultStatus.OK, code.error
    assert isinstance(code.output, CodeOutput) and code.output.chunks >= 3
    jsonschema.validate(code.output.analysis.model_dump(mode="json"), published("code_analysis.schema.json"))
    # And the document was extracted in several chunks in one request and merged into one valid graph
    assert result.status is ResultStatus.OK, result.error
    out = result.output
    assert isinstance(out, GraphOutput) and out.chunks >= 2
    assert out.prompt_tokens > limit  # every part of the text was read, none silently cut
    KnowledgeGraph.model_validate(out.graph.model_dump())
    labels = [normalise_label(n.label) for n in out.graph.nodes]
    assert len(labels) == len(set(labels))
    assert_mermaid_matches(out.graph, out.mermaid)


def _whole_file(*, min_chars: int, max_chars: int) -> tuple[str, str]:
    path = next(p for p in stdlib_files() if min_chars <= p.stat().st_size <= max_chars)
    return path.name, path.read_text(encoding="utf-8")


def _long_document(ctx: TaskContext, *, min_tokens: int) -> str:
    import ast

    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        if len(ctx.engine.tokenizer(text)["input_ids"]) >= min_tokens:
            return text
    raise AssertionError("no standard-library module has that much documentation")


def test_generate_with_a_response_schema_and_with_a_malformed_one(ctx: TaskContext, tmp_path: Path) -> None:
    # Given one generate task with a valid schema, one whose schema is malformed, and one whose
    # max_tokens cannot hold the JSON
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    prompt = "The capital of France, as JSON: "
    envelopes = [
        {"task_id": "ok", "kind": "generate", "payload": {"prompt": prompt, "max_tokens": 24, "response_schema": schema}},
        {"task_id": "bad", "kind": "generate", "payload": {"prompt": prompt, "response_schema": {"type": "objekt"}}},
        {"task_id": "short", "kind": "generate", "payload": {"prompt": prompt, "max_tokens": 3, "response_schema": schema}},
    ]
    # When run
    ok, bad, short = run_envelopes(ctx, tmp_path, envelopes)
    # Then the first is JSON of its schema, the second a clear error naming the schema problem
    # (decided before any batch ran: no timings from the engine), the third says it was cut
    assert ok.status is ResultStatus.OK and isinstance(ok.output, GenerateOutput)
    jsonschema.validate(json.loads(ok.output.text), schema)
    assert bad.status is ResultStatus.ERROR and bad.error.code == ErrorCode.INVALID_RESPONSE_SCHEMA
    assert "objekt" in bad.error.message and not bad.error.retryable and bad.timings.inference_ms is None
    assert short.status is ResultStatus.ERROR and short.error.code == ErrorCode.OUTPUT_TRUNCATED
    assert "max_tokens=3" in short.error.message


def test_a_temperature_the_sampler_cannot_divide_by_is_an_error_result_alone(ctx: TaskContext, tmp_path: Path) -> None:
    # Given a task whose temperature underflows the sampler (1e-45: logits / temperature are inf),
    # sent with a sampled task beside it, as the pull worker sends them (not through the HTTP edge)
    prompt = "The capital of France is"
    envelopes = [
        {"task_id": "tiny", "kind": "generate", "payload": {"prompt": prompt, "max_tokens": 4, "temperature": 1e-45}},
        {"task_id": "fine", "kind": "generate",
         "payload": {"prompt": prompt, "max_tokens": 4, "temperature": 0.7, "seed": 3}},
    ]
    # When run
    tiny, fine = run_envelopes(ctx, tmp_path, envelopes)
    # Then the first is a clear, final error naming the smallest temperature taken, and the other is answered
    assert tiny.status is ResultStatus.ERROR and tiny.error.code == ErrorCode.INVALID_PARAMETER
    assert "0 (greedy) or at least 1e-06" in tiny.error.message and not tiny.error.retryable
    assert fine.status is ResultStatus.OK and isinstance(fine.output, GenerateOutput) and fine.output.text
