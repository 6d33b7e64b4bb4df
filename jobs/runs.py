"""A run's shared facts, its manifest and the `latest` pointer.

The first task of an execution fixes the run's spec (model, dims, which previous run to reuse);
every later task and retry reads it, so all shards agree even if `latest` moves meanwhile.
The task that sees the last shard finished writes the manifest, then moves `latest` with a
generation precondition: a reader that follows `latest` always finds a complete run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from jobs.errors import JobError
from jobs.parts import LATEST, Rows, RunLayout, chunk_shard, concat_rows, decode_rows, record_shard
from jobs.progress import shards_written
from worker.store import Store

log = logging.getLogger(__name__)
SHARD_FUNCTION = "sha256(id)[:8] big-endian mod task_count"
INVALID_SAMPLE = 100


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """What every task of one run must agree on; written create-only by the first task."""

    run_id: str
    model: str
    dims: int
    max_input_tokens: int
    task_count: int
    chunk_rows: int
    nodes: str
    id_field: str
    text_field: str
    previous: str | None
    started_at: str
    shard_function: str = SHARD_FUNCTION

    def reuse_key(self) -> tuple[Any, ...]:
        """Vectors are only reusable between runs that agree on all of these."""
        return self.model, self.dims, self.max_input_tokens


def open_run(store: Store, wanted: RunSpec, *, previous_given: bool) -> RunSpec:
    """The run's spec: `wanted` if this task is first, else the stored one, which must agree with it."""
    layout = RunLayout(wanted.run_id)
    if store.put_if_absent(layout.spec, json.dumps(asdict(wanted), indent=2).encode()):
        return wanted
    raw = store.get(layout.spec)
    if raw is None:
        raise JobError("storage_inconsistent", f"{store.uri(layout.spec)} existed a moment ago but cannot be read; "
                       "retry", retryable=True)
    stored = RunSpec(**json.loads(raw))
    checked = ["model", "dims", "max_input_tokens", "task_count", "chunk_rows", "nodes", "id_field", "text_field"]
    checked += ["previous"] if previous_given else []
    for name in checked:
        if getattr(stored, name) != getattr(wanted, name):
            raise JobError("run_mismatch", (
                f"run {wanted.run_id} was started with {name}={getattr(stored, name)!r} but this task has "
                f"{getattr(wanted, name)!r}; give every task of a run the same options, or start a new run id"))
    return stored


def read_latest(store: Store) -> dict[str, Any] | None:
    """The pointer to the newest finished run, or None before the first one finishes."""
    raw = store.get(LATEST)
    return json.loads(raw) if raw else None


def read_manifest(store: Store, run_id: str) -> dict[str, Any] | None:
    raw = store.get(RunLayout(run_id).manifest)
    return json.loads(raw) if raw else None


def read_run(store: Store, run_id: str | None = None) -> tuple[dict[str, Any], Rows]:
    """A finished run's manifest and all its rows (the latest run by default), checksums verified."""
    run_id = run_id or (read_latest(store) or {}).get("run_id")
    manifest = read_manifest(store, run_id) if run_id else None
    if manifest is None:
        raise JobError("run_not_found", f"no finished run {run_id or '(latest)'} at {store.uri(run_id or LATEST)}")
    parts = []
    for shard in manifest["shards"]:
        data = store.get(shard["name"]) or b""
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise JobError("checksum_mismatch", f"{store.uri(shard['name'])} does not match run {run_id}'s manifest; "
                           "it was changed or is incomplete, re-run the job")
        parts.append(decode_rows(data, where=store.uri(shard["name"]))[0])
    return manifest, concat_rows(parts, model=manifest["model"], dims=manifest["dims"])


def finalise(store: Store, spec: RunSpec) -> dict[str, Any] | None:
    """Write the manifest and move `latest` once every shard is done; None while some are not.

    Safe to call from every task, any number of times: the manifest is create-only and the
    pointer move is a compare-and-swap that never moves `latest` back to an older run."""
    layout = RunLayout(spec.run_id)
    stats_names = list(store.list(layout.shard_stats_prefix))
    if len(stats_names) < spec.task_count:
        return None
    shards = [json.loads(store.get(layout.shard_stats(i)) or b"null") for i in range(spec.task_count)]
    if any(s is None for s in shards) or not all(store.exists(layout.part(i)) for i in range(spec.task_count)):
        return None  # a shard's stats exist but its part does not yet: that task will finish it
    manifest = build_manifest(spec, shards)
    if not store.put_if_absent(layout.manifest, json.dumps(manifest, indent=2).encode()):
        manifest = read_manifest(store, spec.run_id) or manifest
    move_latest(store, {"run_id": spec.run_id, "manifest": layout.manifest, "started_at": spec.started_at,
                        "finished_at": manifest["finished_at"], "model": spec.model, "dims": spec.dims,
                        "node_count": manifest["node_count"]})
    return manifest


def build_manifest(spec: RunSpec, shards: list[dict[str, Any]]) -> dict[str, Any]:
    finished = utc_now()
    started = datetime.fromisoformat(spec.started_at)
    invalid = sorted((line for s in shards for line in s["invalid_sample"]), key=lambda x: (x["source"], x["line"]))
    return {
        "run_id": spec.run_id, "model": spec.model, "dims": spec.dims, "max_input_tokens": spec.max_input_tokens,
        "nodes": spec.nodes, "previous": spec.previous, "task_count": spec.task_count,
        "node_count": sum(s["rows"] for s in shards),
        "reused": sum(s["reused"] for s in shards), "embedded": sum(s["embedded"] for s in shards),
        "truncated": sum(s["truncated"] for s in shards),
        "input_lines": shards[0]["input_lines"] if shards else 0,
        "invalid": {"count": sum(s["invalid_count"] for s in shards), "lines": invalid[:INVALID_SAMPLE]},
        "shards": [{k: s[k] for k in ("index", "name", "rows", "bytes", "sha256", "reused", "embedded")}
                   for s in shards],
        "format": {"columns": ["id", "content_sha256", "model", "dims", "embedding"], "embedding": "list<float32>",
                   "sorted_by": "id", "shard_function": spec.shard_function},
        "started_at": spec.started_at, "finished_at": finished,
        "duration_s": round((datetime.fromisoformat(finished) - started).total_seconds(), 3),
    }


def move_latest(store: Store, pointer: dict[str, Any], *, attempts: int = 20) -> bool:
    """Point `latest` at this run unless it already names it or a run that started later."""
    data = json.dumps(pointer, indent=2).encode()
    for attempt in range(attempts):
        found = store.get_with_generation(LATEST)
        generation = None
        if found is not None:
            current, generation = json.loads(found[0]), found[1]
            if current.get("run_id") == pointer["run_id"]:
                return True
            if current.get("started_at", "") > pointer["started_at"]:
                log.warning("latest names %s, which started after %s; leaving it", current.get("run_id"),
                            pointer["run_id"])
                return False
        if store.put_if_generation(LATEST, data, generation=generation):
            log.info("latest now names run %s", pointer["run_id"])
            return True
        time.sleep(min(0.05 * 2**attempt, 1.0))  # another finaliser won the swap; look again
    raise JobError("latest_contended", f"could not move {store.uri(LATEST)} after {attempts} tries; retry the task",
                   retryable=True)


def run_status(store: Store, run_id: str) -> dict[str, Any]:
    """How far a run is: its spec, shards and chunks done, and its manifest once it has one."""
    layout = RunLayout(run_id)
    raw = store.get(layout.spec)
    if raw is None:
        raise JobError("run_not_found", f"no run {run_id} at {store.uri(layout.spec)}; `reembed-status` lists latest")
    spec = json.loads(raw)
    plans = {record_shard(n): json.loads(store.get(n) or b"{}")
             for n in store.list(layout.plans_prefix)}
    written = shards_written(store, layout)
    # A written shard's chunks are deleted: count them from its plan
    chunks = sum(-(-p.get("rows", 0) // max(p.get("chunk_rows", 1), 1)) for i, p in plans.items() if i in written)
    chunks += sum(1 for n in store.list(layout.chunks_prefix) if chunk_shard(n) not in written)
    return {"run_id": run_id, "spec": spec, "shards_planned": len(plans),
            "rows_planned": sum(p.get("rows", 0) for p in plans.values()), "chunks_done": chunks,
            "shards_done": len(written), "manifest": read_manifest(store, run_id)}
