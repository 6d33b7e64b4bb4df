"""The model-free parts of `graph` and `code` tasks: merging chunk results, Mermaid text that
parses back to the graph, language guessing, and chunking that covers the whole document."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.errors import ErrorCode, TaskError
from schemas.graph import (
    MAX_CHUNKS,
    CodeAnalysisChunk,
    Edge,
    GraphChunk,
    KnowledgeGraph,
    Node,
    to_mermaid,
)
from worker.corpus import stdlib_files
from worker.engine import Engine
from worker.tasks.chunking import split_into_chunks
from worker.tasks.code import guess_language, merge_analyses
from worker.tasks.graph import merge_graphs
from tests.worker.tasks.support import assert_mermaid_matches

def _node(node_id: str, label: str, **kw: str) -> Node:
    return Node(id=node_id, label=label, type=kw.pop("type", "concept"), **kw)


def test_merge_joins_nodes_by_label_and_cleans_edges() -> None:
    # Given two chunk graphs that both mention "JSON Decoder" (spelled differently), a self-loop,
    # an edge to an unknown node, an edge by label instead of id, and a duplicate edge
    first = GraphChunk(nodes=[_node("json", "json"), _node("decoder", "JSON Decoder")],
                       edges=[Edge(source="json", target="decoder", relation="uses"),
                              Edge(source="json", target="json", relation="is"),
                              Edge(source="json", target="ghost", relation="haunts")])
    second = GraphChunk(nodes=[_node("jsondecoder", "json  decoder", description="Parses JSON text."),
                               _node("str", "str", type="class")],
                        edges=[Edge(source="jsondecoder", target="str", relation="returns"),
                               Edge(source="json_decoder", target="str", relation="returns"),
                               Edge(source="json", target="jsondecoder", relation="uses")])
    # When merged
    graph = merge_graphs([first, second])
    # Then one node per label, the description kept, and only real, distinct, non-loop edges
    assert [n.label for n in graph.nodes] == ["json", "JSON Decoder", "str"]
    assert graph.nodes[1].description == "Parses JSON text."
    ids = {n.label: n.id for n in graph.nodes}
    assert {(e.source, e.relation, e.target) for e in graph.edges} == {
        (ids["json"], "uses", ids["JSON Decoder"]), (ids["JSON Decoder"], "returns", ids["str"])}
    assert len(graph.edges) == 2


def test_knowledge_graph_rejects_an_edge_to_a_missing_node() -> None:
    # Given an edge whose target is not a node / When validated / Then it is refused, naming the end
    with pytest.raises(ValidationError, match="unknown node"):
        KnowledgeGraph(nodes=[_node("a", "A")], edges=[Edge(source="a", target="b", relation="r")])


def test_mermaid_escapes_labels_and_parses_back() -> None:
    # Given labels with quotes, #, angle brackets, pipes, newlines and a keyword-like id
    graph = KnowledgeGraph(
        nodes=[_node("end", 'say "hi" #1'), _node("graph", "a <b> | c"), _node("x_1", "line\nbreak")],
        edges=[Edge(source="end", target="graph", relation='calls "it"'), Edge(source="graph", target="x_1", relation="a|b")])
    # When rendered
    text = to_mermaid(graph)
    # Then no raw quote leaks into a label, ids are prefixed, and parsing gives the graph back
    assert '"say "hi"' not in text and "n_end[" in text
    assert_mermaid_matches(graph, text)


def test_code_merge_deduplicates_and_prefers_the_known_language() -> None:
    part = {"language": "Python", "summary": "Part one.",
            "entities": [{"kind": "function", "name": "f", "purpose": "Does f."}],
            "dependencies": ["os", "sys"], "issues": [{"severity": "info", "message": "No tests."}]}
    other = {**part, "summary": "Part two.", "dependencies": ["sys", "re"],
             "entities": [{"kind": "function", "name": "f", "purpose": "Again."},
                          {"kind": "class", "name": "C", "purpose": "A class."}]}
    merged = merge_analyses([CodeAnalysisChunk(**part), CodeAnalysisChunk(**other)], language="python")
    assert merged.language == "python" and merged.summary == "Part one. Part two."
    assert [e.name for e in merged.entities] == ["f", "C"] and merged.entities[0].purpose == "Does f."
    assert merged.dependencies == ["os", "sys", "re"] and len(merged.issues) == 1


@pytest.mark.parametrize(("filename", "source", "expected"), [
    ("pkg/mod.py", "x = 1\n", ("python", "filename")),
    ("C:\\src\\main.RS", "", ("rust", "filename")),
    ("Makefile", "all:\n", ("make", "filename")),
    (None, "#!/usr/bin/env python3\nprint(1)\n", ("python", "content")),
    (None, "#!/bin/bash\necho hi\n", ("shell", "content")),
    (None, "package main\n\nimport \"fmt\"\n\nfunc main() {}\n", ("go", "content")),
    (None, "#include <stdio.h>\nint main(void) { return 0; }\n", ("c", "content")),
    (None, "import os\n\ndef f(x):\n    return x\n", ("python", "content")),
    (None, "const x = require('fs');\n", ("javascript", "content")),
    ("notes.txt", "just some words", (None, "model")),
])
def test_language_is_guessed_from_name_then_content(filename: str | None, source: str, expected: tuple) -> None:
    assert guess_language(filename=filename, source=source) == expected


def test_chunks_cover_the_whole_text_within_the_token_size(engine: Engine) -> None:
    # Given a real standard-library source file of several thousand tokens
    text = next(p for p in stdlib_files() if 6000 < p.stat().st_size < 12000).read_text()
    # When split into 300-token chunks
    chunks = split_into_chunks(engine, text, chunk_tokens=300, what="source")
    # Then they are the text in order, each within the size (cut at line ends where it could)
    assert "".join(chunks) == text and len(chunks) > 3
    sizes = [len(engine.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(sizes) <= 300 + 2  # re-tokenizing a piece may merge or split at its edges
    assert sum(c.endswith("\n") for c in chunks[:-1]) >= len(chunks) - 2


def test_a_document_needing_too_many_chunks_is_refused(engine: Engine) -> None:
    text = "word " * (MAX_CHUNKS * 20 + 50)
    with pytest.raises(TaskError) as caught:
        split_into_chunks(engine, text, chunk_tokens=16, what="text")
    assert caught.value.code == ErrorCode.INPUT_TOO_LONG and f"{MAX_CHUNKS} chunks" in caught.value.message
