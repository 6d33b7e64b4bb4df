"""Small real corpora and helpers shared by the re-embedding tests."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from jobs.reembed import JobConfig, TaskEnv, TaskSummary, run_task
from jobs.runs import read_run
from worker.corpus import stdlib_docstrings
from worker.engine import Engine
from worker.store import Store

TIMING_FIELDS = ("started_at", "finished_at", "duration_s")


def corpus_nodes(n: int) -> list[dict[str, Any]]:
    """n real standard-library docstrings, cut short so the model runs fast, with stable ids."""
    texts = stdlib_docstrings(n, max_chars=80)
    assert len(texts) == n
    return [{"id": f"node-{i:04d}", "text": text, "kind": "docstring", "weight": i} for i, text in enumerate(texts)]


def jsonl_bytes(nodes: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(node) + "\n" for node in nodes).encode()


def parquet_bytes(nodes: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(nodes), buffer)
    return buffer.getvalue()


def write_nodes(directory: Path, nodes: list[dict[str, Any]], *, files: int = 1) -> Path:
    """Nodes spread round-robin over `files` JSONL files in a fresh directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        (directory / f"nodes-{f:03d}.jsonl").write_bytes(jsonl_bytes(nodes[f::files]))
    return directory


def run_all_tasks(config: JobConfig, *, tasks: int, engine: Engine, client: Any = None,
                  order: list[int] | None = None) -> list[TaskSummary]:
    """Every task of one run, in this process, one after another (Cloud Run would run them side by side)."""
    return [run_task(config, TaskEnv(index=i, count=tasks), engine_factory=lambda: engine, client=client)
            for i in (order or range(tasks))]


def run_vectors(store: Store, run_id: str | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """id -> (content_sha256, vector) of a finished run."""
    _, rows = read_run(store, run_id)
    assert len(set(rows.ids)) == len(rows.ids), "a node appears in more than one row"
    return {i: (sha, rows.vectors[k]) for k, (i, sha) in enumerate(zip(rows.ids, rows.content_sha256))}


def min_cosine(a: dict[str, tuple[str, np.ndarray]], b: dict[str, tuple[str, np.ndarray]]) -> float:
    assert a.keys() == b.keys()
    return min(float(np.dot(a[k][1], b[k][1]) / (np.linalg.norm(a[k][1]) * np.linalg.norm(b[k][1]))) for k in a)


def without_timing(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in TIMING_FIELDS}
