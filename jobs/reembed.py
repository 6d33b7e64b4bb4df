"""One task of a bulk re-embedding run: the Cloud Run Job's entry (`cli.py reembed-task`).

A task reads every node file, keeps the nodes whose id hashes to its index, sorts them by id,
and walks the sorted shard in fixed row ranges ("chunks"). Each chunk is embedded (or reused
from the previous run) and written create-only, so a retried or killed task resumes at the first
missing chunk and ends with the same bytes an uninterrupted run would. The finished shard and its
counts follow, the shard's chunks are deleted, and (for whichever task finishes last) the
manifest and `latest` are written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.errors import JobError
from jobs.nodes import InvalidLine, Node, read_nodes, shard_of, stable_hash
from jobs.parts import RunLayout, Rows, chunk_start, check_run_id, concat_rows, decode_rows, encode_rows
from jobs.progress import ProgressView
from jobs.reuse import resolve_previous, reusable_vectors
from jobs.runs import INVALID_SAMPLE, RunSpec, finalise, open_run, utc_now
from schemas.errors import TaskError
from worker.store import Store, open_store

if TYPE_CHECKING:
    from google.cloud import storage

    from worker.engine import Engine

log = logging.getLogger(__name__)
EXIT_RETRY = 75  # EX_TEMPFAIL: the local runner retries it, as Cloud Run retries any failed task
EXIT_FATAL = 2  # running the same task again cannot help


@dataclass(frozen=True)
class TaskEnv:
    """Which task this process is, as Cloud Run tells it (defaults: the only task, first attempt)."""

    index: int = 0
    count: int = 1
    attempt: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TaskEnv:
        try:
            task = cls(index=int(environ.get("CLOUD_RUN_TASK_INDEX", "0")),
                       count=int(environ.get("CLOUD_RUN_TASK_COUNT", "1")),
                       attempt=int(environ.get("CLOUD_RUN_TASK_ATTEMPT", "0")))
        except ValueError as exc:
            raise JobError("invalid_task_env", f"CLOUD_RUN_TASK_* must be integers: {exc}") from None
        if not (task.count >= 1 and 0 <= task.index < task.count and task.attempt >= 0):
            raise JobError("invalid_task_env", f"need 0 <= CLOUD_RUN_TASK_INDEX < CLOUD_RUN_TASK_COUNT, got {task}")
        return task


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """The options of a run; every task of one run gets the same."""

    nodes: str
    out: str
    run_id: str
    previous: str | None = None  # None: the run `latest` names; "none": embed every node
    dims: int | None = None  # None: the model's full width
    strict: bool = False
    id_field: str = "id"
    text_field: str = "text"
    chunk_rows: int = 256
    task_timeout_s: float | None = None
    timeout_margin_s: float | None = None  # None: 10% of the timeout, at most 120 s
    progress_interval_s: float = 10.0


@dataclass(frozen=True)
class TaskSummary:
    run_id: str
    index: int
    attempt: int
    rows: int
    reused: int
    embedded: int
    chunks: int
    chunks_resumed: int
    invalid: int
    finalised: bool


def resolve_run_id(explicit: str | None, *, task: TaskEnv, environ: Mapping[str, str] = os.environ) -> str:
    """--run-id, else Cloud Run's execution name (one per execution, shared by its tasks), else a new id."""
    run_id = explicit or environ.get("CLOUD_RUN_EXECUTION")
    if run_id:
        return check_run_id(run_id)
    if task.count > 1:
        raise JobError("missing_run_id", "the tasks of one run must share a run id: pass --run-id (the `reembed` "
                       "command does) or run on Cloud Run, which sets CLOUD_RUN_EXECUTION")
    return new_run_id()


def new_run_id() -> str:
    return f"run-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class Budget:
    """Stop before Cloud Run's task timeout, leaving checkpoints for the retry."""

    def __init__(self, *, timeout_s: float | None, margin_s: float | None, started: float) -> None:
        margin = min(120.0, 0.1 * timeout_s) if timeout_s and margin_s is None else (margin_s or 0.0)
        self.timeout_s = timeout_s
        self.deadline = started + timeout_s - margin if timeout_s else None

    def check(self, *, next_cost_s: float, where: str) -> None:
        if self.deadline is not None and time.monotonic() + next_cost_s > self.deadline:
            raise JobError("time_budget_exhausted", (
                f"stopped at {where} to stay within the {self.timeout_s:g}s task timeout; the work so far is "
                "checkpointed and a retry (CLOUD_RUN_TASK_ATTEMPT+1) continues from there"), retryable=True)


def invalid_owner(line: InvalidLine, count: int) -> int:
    """Every task sees every bad line; exactly one reports it, so the run counts each once."""
    return shard_of(line.node_id, count) if line.node_id else stable_hash(f"{line.source}:{line.line}") % count


def run_task(config: JobConfig, task: TaskEnv, *, engine_factory: Callable[[], Engine],
             client: storage.Client | None = None, started: float | None = None) -> TaskSummary:
    """Make this task's shard exist (resuming from checkpoints), then finalise the run if it is the last."""
    budget = Budget(timeout_s=config.task_timeout_s, margin_s=config.timeout_margin_s,
                    started=time.monotonic() if started is None else started)
    out = open_store(config.out, client=client)
    layout = RunLayout(check_run_id(config.run_id))
    if out.exists(layout.shard_stats(task.index)) and out.exists(layout.part(task.index)):
        return _finish_done_shard(out, layout, task)
    read = read_nodes(config.nodes, id_field=config.id_field, text_field=config.text_field,
                      keep=lambda node_id: shard_of(node_id, task.count) == task.index, client=client)
    _check_input(read.invalid, lines=read.lines, strict=config.strict, where=config.nodes)
    mine = sorted(line for line in read.invalid if invalid_owner(line, task.count) == task.index)
    for line in mine[:INVALID_SAMPLE]:
        log.warning("skipped invalid node at %s:%d: %s", line.source, line.line, line.reason)
    engine = engine_factory()
    spec = open_run(out, RunSpec(
        run_id=layout.run_id, model=engine.name, dims=engine.check_dims(config.dims),
        max_input_tokens=engine.max_input_tokens, task_count=task.count, chunk_rows=config.chunk_rows,
        nodes=config.nodes, id_field=config.id_field, text_field=config.text_field,
        previous=resolve_previous(out, config.previous), started_at=utc_now()), previous_given=config.previous is not None)
    nodes = sorted(read.nodes, key=lambda n: n.id)
    out.put_if_absent(layout.plan(task.index), json.dumps({"rows": len(nodes), "chunk_rows": spec.chunk_rows}).encode())
    resumed = _embed_chunks(out, layout, spec, task=task, nodes=nodes, engine=engine, budget=budget,
                            progress_interval_s=config.progress_interval_s)
    stats = _write_shard(out, layout, spec, index=task.index, nodes=nodes, invalid=mine, input_lines=read.lines)
    drop_checkpoints(out, layout, task.index)
    manifest = finalise(out, spec)
    return TaskSummary(run_id=layout.run_id, index=task.index, attempt=task.attempt, rows=stats["rows"],
                       reused=stats["reused"], embedded=stats["embedded"],
                       chunks=-(-len(nodes) // spec.chunk_rows), chunks_resumed=resumed,
                       invalid=stats["invalid_count"], finalised=manifest is not None)


def _check_input(invalid: list[InvalidLine], *, lines: int, strict: bool, where: str) -> None:
    if lines == 0:
        raise JobError("no_nodes", f"{where} holds no node lines; an empty export would publish an empty run")
    if strict and invalid:
        first = "; ".join(f"{x.source}:{x.line}: {x.reason}" for x in sorted(invalid)[:5])
        raise JobError("invalid_nodes", f"{len(invalid)} invalid node line(s) and --strict is set; first: {first}. "
                       "Fix them, or drop --strict to skip and count them")
    if len(invalid) == lines:
        raise JobError("no_valid_nodes", f"none of the {lines} lines in {where} is a valid node; check "
                       "--id-field and --text-field")


def _finish_done_shard(out: Store, layout: RunLayout, task: TaskEnv) -> TaskSummary:
    """A retry after the shard was written: only the finalising may be left to do."""
    spec = RunSpec(**json.loads(out.get(layout.spec) or b"{}"))
    stats = json.loads(out.get(layout.shard_stats(task.index)) or b"{}")
    drop_checkpoints(out, layout, task.index)  # an attempt that died between the part and the cleanup
    manifest = finalise(out, spec)
    return TaskSummary(run_id=layout.run_id, index=task.index, attempt=task.attempt, rows=stats["rows"],
                       reused=stats["reused"], embedded=stats["embedded"], chunks=0, chunks_resumed=0,
                       invalid=stats["invalid_count"], finalised=manifest is not None)


def drop_checkpoints(out: Store, layout: RunLayout, index: int) -> int:
    """Delete a written shard's checkpoint chunks (its part holds the same rows); returns how many
    went. Best effort: a chunk that cannot be deleted now costs only storage, so the failure is
    logged and the task goes on (a later attempt of the task deletes what is left)."""
    removed = 0
    try:
        for name in out.list(layout.chunk_prefix(index)):
            removed += out.delete(name)
    except TaskError as exc:
        log.warning("left checkpoints of shard %d of run %s in place: %s", index, layout.run_id, exc.message)
    return removed


def _embed_chunks(out: Store, layout: RunLayout, spec: RunSpec, *, task: TaskEnv, nodes: list[Node], engine: Engine,
                  budget: Budget, progress_interval_s: float) -> int:
    """Write every missing chunk of the sorted shard; returns how many were already there."""
    done = {chunk_start(name) for name in out.list(layout.chunk_prefix(task.index))}
    starts = range(0, len(nodes), spec.chunk_rows)
    todo = [s for s in starts if s not in done]
    if not todo:
        return len(done)
    reusable = reusable_vectors(out, spec, index=task.index, nodes=[n for s in todo for n in
                                                                     nodes[s:s + spec.chunk_rows]])
    rows_done = sum(min(s + spec.chunk_rows, len(nodes)) - s for s in done)
    progress = ProgressView(interval_s=progress_interval_s, label=f"task {task.index}", start=(rows_done, len(nodes)),
                            fields={"run_id": spec.run_id, "task_index": task.index, "attempt": task.attempt})
    last_cost = 0.0
    for n, start in enumerate(todo):
        if n:  # at least one chunk per attempt, so even a tiny budget makes progress
            budget.check(next_cost_s=last_cost, where=f"row {start} of {len(nodes)} (task {task.index})")
        began = time.monotonic()
        chunk = nodes[start:start + spec.chunk_rows]
        rows, counts = embed_chunk(engine, chunk, reusable, model=spec.model, dims=spec.dims)
        out.put_if_absent(layout.chunk(task.index, start), encode_rows(rows, metadata=counts))
        last_cost = time.monotonic() - began
        rows_done += len(chunk)
        progress.update(rows_done, len(nodes), force=n == len(todo) - 1)
    return len(done)


def embed_chunk(engine: Engine, nodes: list[Node], reusable: dict[str, np.ndarray], *, model: str,
                dims: int) -> tuple[Rows, dict[str, int]]:
    """Vectors for one chunk: reused where the previous run had this exact text, embedded otherwise."""
    vectors = np.empty((len(nodes), dims), dtype=np.float32)
    todo = [k for k, node in enumerate(nodes) if node.id not in reusable]
    for k, node in enumerate(nodes):
        if node.id in reusable:
            vectors[k] = reusable[node.id]
    truncated = 0
    if todo:
        # Texts over max_input_tokens are cut, not failed: one long node must not stop the graph.
        items = engine.tokenize([nodes[k].text for k in todo], truncate=True, what="text")
        embedded = engine.embed_tokenized(items, dims=dims)  # sorts by length and batches by token budget
        vectors[todo] = embedded.vectors
        truncated = sum(embedded.truncated)
    rows = Rows(ids=[n.id for n in nodes], content_sha256=[n.content_sha256 for n in nodes], model=model, dims=dims,
                vectors=vectors)
    return rows, {"reused": len(nodes) - len(todo), "embedded": len(todo), "truncated": truncated}


def _write_shard(out: Store, layout: RunLayout, spec: RunSpec, *, index: int, nodes: list[Node],
                 invalid: list[InvalidLine], input_lines: int) -> dict[str, Any]:
    """Join the chunks into the shard's part; its stats go first, so the part's presence means both exist."""
    parts, counts = [], Counter[str]()
    for start in range(0, len(nodes), spec.chunk_rows):
        name = layout.chunk(index, start)
        data = out.get(name)
        if data is None:
            raise JobError("checkpoint_missing", f"{out.uri(name)} vanished; retry the task", retryable=True)
        rows, meta = decode_rows(data, where=out.uri(name))
        expected = nodes[start:start + spec.chunk_rows]
        if rows.ids != [n.id for n in expected] or rows.content_sha256 != [n.content_sha256 for n in expected]:
            raise JobError("nodes_changed", (
                f"{out.uri(name)} holds other nodes than the input now has: the nodes changed after run "
                f"{spec.run_id} started. Start a new run id (a new execution) over a stable export"))
        parts.append(rows)
        counts.update(meta)
    data = encode_rows(concat_rows(parts, model=spec.model, dims=spec.dims))
    stats = {"index": index, "name": layout.part(index), "rows": len(nodes), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "reused": counts["reused"], "embedded": counts["embedded"],
             "truncated": counts["truncated"], "invalid_count": len(invalid), "input_lines": input_lines,
             "invalid_sample": [x.to_json() for x in invalid[:INVALID_SAMPLE]]}
    out.put_if_absent(layout.shard_stats(index), json.dumps(stats, indent=2).encode())
    out.put_if_absent(layout.part(index), data)
    return stats


def run_task_command(config: JobConfig, *, engine_factory: Callable[[], Engine],
                     environ: Mapping[str, str] = os.environ) -> int:
    """What `cli.py reembed-task` does: run this process's task, print a summary line, return the exit status."""
    started = time.monotonic()
    try:
        task = TaskEnv.from_env(environ)
        config = JobConfig(**{**asdict(config), "run_id": resolve_run_id(config.run_id or None, task=task,
                                                                          environ=environ)})
        summary = run_task(config, task, engine_factory=engine_factory, started=started)
    except (JobError, TaskError) as exc:
        code = exc.code if isinstance(exc, JobError) else exc.code.value
        log.error("re-embedding task failed: [%s] %s", code, exc.message)
        print(json.dumps({"event": "task_failed", "code": code, "message": exc.message,
                          "retryable": exc.retryable}), flush=True)
        return EXIT_RETRY if exc.retryable else EXIT_FATAL
    print(json.dumps({"event": "task_done", **asdict(summary)}), flush=True)
    return 0

