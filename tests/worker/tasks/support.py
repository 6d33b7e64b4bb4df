"""Running tasks the way the worker does (envelopes through a Runner with a real batcher and a
local store, all submitted before any is awaited so they share engine calls), and reading Mermaid back."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema

from schemas.export import SCHEMA_DIR
from schemas.graph import KnowledgeGraph, mermaid_unescape
from schemas.result import Result
from worker.runner import Delivery, Outcome, Runner, result_name
from worker.store import LocalStore
from worker.tasks import TaskContext


def run_envelopes(ctx: TaskContext, root: Path, envelopes: list[dict[str, Any]],
                  *, timeout: float = 1200) -> list[Result]:
    """One Result per envelope, in order, read back from the store and checked against result.schema.json."""
    store = LocalStore(root)
    runner = Runner(ctx=ctx, store=store)
    try:
        futures = [runner.submit(Delivery(data=json.dumps(env).encode(), attributes={}, message_id=env["task_id"]))
                   for env in envelopes]
        outcomes = [f.result(timeout=timeout) for f in futures]
    finally:
        runner.close()
    assert Outcome.RETRY not in outcomes, outcomes
    schema = json.loads((SCHEMA_DIR / "result.schema.json").read_text())
    results = []
    for env in envelopes:
        raw = json.loads(store.get(result_name(env.get("batch_id"), env["task_id"])))
        jsonschema.validate(raw, schema)
        results.append(Result.model_validate(raw))
    return results


def published(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / name).read_text())


NODE_LINE = re.compile(r'^    (\w+)\["(.*)"\]$')
EDGE_LINE = re.compile(r'^    (\w+) -->\|"(.*)"\| (\w+)$')


def parse_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Mermaid `graph TD` text back into {mermaid id: label} and [(source label, relation, target label)]."""
    lines = text.splitlines()
    assert lines[0] == "graph TD"
    nodes: dict[str, str] = {}
    edges: list[tuple[str, str, str]] = []
    for line in lines[1:]:
        if m := NODE_LINE.match(line):
            assert m.group(1) not in nodes, f"node id {m.group(1)} declared twice"
            nodes[m.group(1)] = mermaid_unescape(m.group(2))
        elif m := EDGE_LINE.match(line):
            edges.append((nodes[m.group(1)], mermaid_unescape(m.group(2)), nodes[m.group(3)]))
        else:
            raise AssertionError(f"unparseable Mermaid line: {line!r}")
    return nodes, edges


def assert_mermaid_matches(graph: KnowledgeGraph, text: str) -> None:
    nodes, edges = parse_mermaid(text)
    labels = {n.id: " ".join(n.label.split()) for n in graph.nodes}
    assert sorted(nodes.values()) == sorted(labels.values())
    assert sorted(edges) == sorted((labels[e.source], " ".join(e.relation.split()), labels[e.target]) for e in graph.edges)
