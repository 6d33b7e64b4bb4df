"""Example agent: turn a document into a knowledge graph through the gemma-batch service.

It calls the service's `POST /graph` route, which runs a `graph` task synchronously (the service
splits the document into chunks, extracts each under a JSON Schema grammar in one batch and merges the
chunk graphs). When the service stays down after the client's retries, a crude local fallback (names
that occur in one sentence become linked nodes) keeps the agent going, and the output says
`"source": "fallback"` so the caller knows the graph is a stand-in.

    .venv/bin/python examples/graph_agent.py document.txt --url http://127.0.0.1:8080

An agent that can wait publishes a `graph` task instead (worker.client.publish_task) and reads the
result object later.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.client import GemmaClient  # noqa: E402

_NAME = re.compile(r"\b[A-Z][a-zA-Z]+(?:\s+[A-Z][a-zA-Z]+)*")


def local_fallback(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A /graph-shaped answer without a model: capitalised names in one sentence, linked in order."""
    nodes: dict[str, dict[str, str]] = {}
    edges = []
    for sentence in re.split(r"(?<=[.!?])\s+", body["text"]):
        names = list(dict.fromkeys(_NAME.findall(sentence)))
        for name in names:
            nodes.setdefault(name, {"id": re.sub(r"\W+", "_", name.lower()), "label": name, "type": "entity"})
        edges += [{"source": nodes[a]["id"], "target": nodes[b]["id"], "relation": "appears with"}
                  for a, b in zip(names, names[1:])]
    return {"graph": {"nodes": list(nodes.values()), "edges": edges}, "fallback": True}


async def document_graph(client: GemmaClient, text: str, *, title: str | None = None,
                         max_tokens: int | None = None) -> dict[str, Any]:
    """The document's graph as {nodes, edges, mermaid?, source}."""
    body: dict[str, Any] = {"text": text, **({"title": title} if title else {}),
                            **({"max_tokens": max_tokens} if max_tokens else {})}
    answer = await client.call("/graph", body)
    graph = answer["graph"]
    source = "fallback" if answer.get("fallback") else "model"
    out = {"nodes": graph["nodes"], "edges": graph["edges"], "source": source}
    if "mermaid" in answer:
        out["mermaid"] = answer["mermaid"]
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    text = sys.stdin.read() if args.document == "-" else Path(args.document).read_text()
    async with GemmaClient(args.url, retries=args.retries, backoff_s=0.2, fallback=local_fallback) as client:
        return await document_graph(client, text, title=args.title, max_tokens=args.max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document", help="a text file, or - for standard input")
    parser.add_argument("--url", default=os.environ.get("GEMMA_BATCH_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--title", default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="per chunk; the service's default otherwise")
    parser.add_argument("--retries", type=int, default=3)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
