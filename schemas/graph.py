"""Structured outputs of `graph` and `code` tasks: a knowledge graph and a code analysis.

Each comes in two sizes. The `*Chunk` models are what the model fills for one chunk of a
document under constrained decoding: small bounded lists and strings, so a 270M model's
grammar-forced JSON ends within a few hundred tokens. The full models are a task's merged
result over all its chunks; `KnowledgeGraph` also checks that every edge joins two of its nodes."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

NODE_ID_PATTERN = r"^[a-z0-9_]{1,40}$"
# Per chunk: small enough that a 270M model's grammar-forced JSON closes in a few hundred tokens.
CHUNK_NODES, CHUNK_EDGES = 4, 4
CHUNK_ENTITIES, CHUNK_DEPENDENCIES, CHUNK_ISSUES = 4, 5, 2
# A task has at most MAX_CHUNKS chunks, so a merged result always fits the full models' bounds.
MAX_CHUNKS = 32

NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=40)]
Word = Annotated[str, StringConstraints(min_length=1, max_length=20)]
Sentence = Annotated[str, StringConstraints(max_length=80)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=40)]


class _Shape(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Node(_Shape):
    id: NodeId = Field(description="Lower-case snake_case key that edges refer to.")
    label: Label = Field(description="The entity's name as the text gives it.")
    type: Word = Field(description="What kind of thing it is: person, organization, concept, module ...")
    description: Sentence | None = Field(default=None, description="One short sentence, when the text says more.")


class Edge(_Shape):
    source: NodeId
    target: NodeId
    relation: Word = Field(description="A short verb phrase: uses, defines, part of ...")


class GraphChunk(_Shape):
    """What the model fills for one chunk; edges may still name unknown nodes (merging drops those)."""

    nodes: list[Node] = Field(min_length=1, max_length=CHUNK_NODES)
    edges: list[Edge] = Field(max_length=CHUNK_EDGES)


class KnowledgeGraph(_Shape):
    """A document's merged graph: unique node ids and labels, every edge between two of its nodes."""

    nodes: list[Node] = Field(max_length=MAX_CHUNKS * CHUNK_NODES)
    edges: list[Edge] = Field(max_length=MAX_CHUNKS * CHUNK_EDGES)

    @model_validator(mode="after")
    def _edges_join_nodes(self) -> KnowledgeGraph:
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError("node ids must be unique")
        known = set(ids)
        for i, edge in enumerate(self.edges):
            missing = [end for end in (edge.source, edge.target) if end not in known]
            if missing:
                raise ValueError(f"edge {i} ({edge.source} -> {edge.target}) names unknown node(s): {', '.join(missing)}")
        return self


class CodeEntity(_Shape):
    kind: Literal["function", "class", "method", "constant", "variable"]
    name: Name
    purpose: Sentence = Field(description="One line: what it is for.")


class CodeIssue(_Shape):
    severity: Literal["info", "warning", "error"]
    message: Sentence


class CodeAnalysisChunk(_Shape):
    """What the model fills for one chunk of a source file."""

    language: Word
    summary: Annotated[str, StringConstraints(max_length=120)]
    entities: list[CodeEntity] = Field(max_length=CHUNK_ENTITIES)
    dependencies: list[Name] = Field(max_length=CHUNK_DEPENDENCIES, description="Imported modules, packages or headers.")
    issues: list[CodeIssue] = Field(max_length=CHUNK_ISSUES)


class CodeAnalysis(_Shape):
    """A source file's merged analysis over all its chunks."""

    language: Word
    summary: Annotated[str, StringConstraints(max_length=2000)]
    entities: list[CodeEntity] = Field(max_length=MAX_CHUNKS * CHUNK_ENTITIES)
    dependencies: list[Name] = Field(max_length=MAX_CHUNKS * CHUNK_DEPENDENCIES)
    issues: list[CodeIssue] = Field(max_length=MAX_CHUNKS * CHUNK_ISSUES)


def normalise_label(label: str) -> str:
    """The key under which two mentions of an entity count as the same node."""
    return " ".join(re.sub(r"[\W_]+", " ", label.casefold()).split())


def slug(text: str, *, max_length: int = 40) -> str:
    """A node id (NODE_ID_PATTERN) made from a label; `n` when nothing usable is left."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", text.casefold())).strip("_")[:max_length].strip("_") or "n"


def to_mermaid(graph: KnowledgeGraph) -> str:
    """A `graph TD` rendering a person can paste into any Mermaid viewer."""
    ids = _mermaid_ids([n.id for n in graph.nodes])
    lines = ["graph TD"]
    lines += [f'    {ids[n.id]}["{mermaid_escape(n.label)}"]' for n in graph.nodes]
    lines += [f'    {ids[e.source]} -->|"{mermaid_escape(e.relation)}"| {ids[e.target]}' for e in graph.edges]
    return "\n".join(lines) + "\n"


def mermaid_escape(text: str) -> str:
    """Text safe inside a quoted Mermaid label: entity codes for the characters Mermaid parses."""
    text = " ".join(text.split())
    for char, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("|", "#124;")):
        text = text.replace(char, code)
    return text


def mermaid_unescape(text: str) -> str:
    for char, code in (("|", "#124;"), (">", "#gt;"), ("<", "#lt;"), ('"', "#quot;"), ("#", "#35;")):
        text = text.replace(code, char)
    return text


def _mermaid_ids(node_ids: list[str]) -> dict[str, str]:
    # A prefix keeps ids such as `end` or `graph` from reading as Mermaid keywords.
    out: dict[str, str] = {}
    for node_id in node_ids:
        base = "n_" + re.sub(r"\W", "_", node_id, flags=re.ASCII)
        candidate, i = base, 2
        while candidate in out.values():
            candidate, i = f"{base}_{i}", i + 1
        out[node_id] = candidate
    return out
