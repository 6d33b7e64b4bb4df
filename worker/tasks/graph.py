"""`graph` tasks: a document in, a knowledge graph out (nodes, edges, a Mermaid rendering, and
optionally one embedding per node). Every chunk is decoded under the `GraphChunk` JSON Schema,
all chunks of a document ride in one batcher request, and the chunk graphs are merged."""
from __future__ import annotations

from schemas.envelope import GraphTask
from schemas.graph import Edge, GraphChunk, KnowledgeGraph, Node, normalise_label, slug, to_mermaid
from schemas.result import GraphOutput
from worker.engine import Generation
from worker.tasks.base import Started, TaskContext
from worker.tasks.chunking import chunk_limit, parse_chunks, split_into_chunks, submit_chunks

GRAPH_SCHEMA = GraphChunk.model_json_schema()

# Few-shot in plain completion form: a small base model follows an example better than an
# instruction, and the example's key order and spacing are the grammar's own.
PROMPT_HEAD = (
    "Extract a knowledge graph from each text: its entities as nodes and the relations between them as "
    "edges. Use names from the text.\n\n"
    "Text: The csv module reads and writes tabular data in CSV format. Its DictReader class maps each row "
    "to a dictionary.\n"
    'JSON: {"nodes": [{"id": "csv", "label": "csv", "type": "module"}, '
    '{"id": "dictreader", "label": "DictReader", "type": "class"}, '
    '{"id": "csv_format", "label": "CSV format", "type": "format"}], '
    '"edges": [{"source": "csv", "target": "csv_format", "relation": "reads"}, '
    '{"source": "dictreader", "target": "csv", "relation": "part of"}]}\n\n'
)


def render_prompt(chunk: str, *, title: str | None) -> str:
    heading = f"Title: {' '.join(title.split())}\n" if title else ""
    return f"{PROMPT_HEAD}{heading}Text: {chunk.strip()}\nJSON: "


def check(task: GraphTask, ctx: TaskContext) -> None:
    """This worker's limits on the task's parameters (no tokenizing)."""
    ctx.engine.check_generate_args(max_new_tokens=task.payload.max_tokens, temperature=0.0, top_p=1.0, stop=None)


def start(task: GraphTask, ctx: TaskContext) -> Started:
    p = task.payload
    check(task, ctx)
    overhead = len(ctx.engine.tokenizer(render_prompt("", title=p.title))["input_ids"]) + 1
    size = chunk_limit(ctx.engine, prompt_overhead=overhead, max_tokens=p.max_tokens, requested=p.chunk_tokens)
    chunks = split_into_chunks(ctx.engine, p.text, chunk_tokens=size, what="text")
    request = submit_chunks(ctx, chunks, render=lambda c: render_prompt(c, title=p.title), schema=GRAPH_SCHEMA,
                            max_tokens=p.max_tokens)

    def finish(out: list[Generation]) -> GraphOutput:
        graph = merge_graphs(parse_chunks(request, out, GraphChunk))
        vectors = _embed_nodes(ctx, graph) if p.embed_nodes else None
        return GraphOutput(graph=graph, mermaid=to_mermaid(graph), chunks=len(chunks), node_embeddings=vectors,
                           prompt_tokens=sum(g.prompt_tokens for g in out),
                           completion_tokens=sum(len(g.token_ids) for g in out))

    return Started(future=request.future, finish=finish)


def merge_graphs(parts: list[GraphChunk]) -> KnowledgeGraph:
    """One graph from the chunks' graphs: a node per normalised label, edges re-pointed to the
    merged nodes and de-duplicated; self-loops and edges to unknown nodes are dropped."""
    nodes: dict[str, Node] = {}  # normalised label -> merged node
    edges: dict[tuple[str, str, str], Edge] = {}
    for part in parts:
        local: dict[str, str] = {}  # the chunk's own ids and labels -> merged id
        for node in part.nodes:
            key = normalise_label(node.label) or f"#{node.id}"
            merged = nodes.get(key)
            if merged is None:
                label = node.label.strip() or node.id
                merged = nodes[key] = node.model_copy(update={"id": _fresh_id(label, nodes), "label": label})
            elif merged.description is None and node.description:
                merged = nodes[key] = merged.model_copy(update={"description": node.description})
            local[node.id] = merged.id
            local.setdefault(key, merged.id)
        for edge in part.edges:
            # A small model sometimes names an edge's end by the label rather than the id it gave.
            source = local.get(edge.source) or local.get(normalise_label(edge.source))
            target = local.get(edge.target) or local.get(normalise_label(edge.target))
            if source is None or target is None or source == target:
                continue
            relation = " ".join(edge.relation.split()) or "related to"
            edges.setdefault((source, target, normalise_label(relation)),
                             Edge(source=source, target=target, relation=relation))
    return KnowledgeGraph(nodes=list(nodes.values()), edges=list(edges.values()))


def _fresh_id(label: str, nodes: dict[str, Node]) -> str:
    taken = {n.id for n in nodes.values()}
    base = slug(label, max_length=36)
    candidate, i = base, 2
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    return candidate


def _embed_nodes(ctx: TaskContext, graph: KnowledgeGraph) -> list[list[float]]:
    """One vector per node (label, type and description), from the same batcher as everything else."""
    texts = [f"{n.label} ({n.type})" + (f": {n.description}" if n.description else "") for n in graph.nodes]
    items = ctx.engine.tokenize(texts, truncate=True, what="node")
    return ctx.batcher.submit_embed(items, dims=None, normalize=True).result().value.vectors.tolist()
