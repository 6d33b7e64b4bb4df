"""Incremental runs: vectors of nodes whose text, model and width are unchanged come from the previous run."""
from __future__ import annotations

import logging

import numpy as np

from jobs.errors import JobError
from jobs.nodes import Node
from jobs.parts import RunLayout, decode_rows
from jobs.runs import RunSpec, read_latest, read_manifest
from worker.store import Store

log = logging.getLogger(__name__)
NO_PREVIOUS = "none"


def resolve_previous(store: Store, previous: str | None) -> str | None:
    """The run to reuse vectors from: the one named, none for "none", else the one `latest` names."""
    if previous is not None:
        return None if previous.lower() == NO_PREVIOUS else previous
    pointer = read_latest(store)
    return pointer["run_id"] if pointer else None


def reusable_vectors(store: Store, spec: RunSpec, *, index: int, nodes: list[Node]) -> dict[str, np.ndarray]:
    """id -> vector from the previous run for each node whose content hash, model and dims match."""
    if spec.previous is None:
        return {}
    manifest = read_manifest(store, spec.previous)
    if manifest is None:
        raise JobError("previous_run_not_found", (
            f"run {spec.previous} has no manifest at {store.uri(RunLayout(spec.previous).manifest)}; name a finished "
            "run with --previous, or pass --previous none to embed everything"))
    theirs = (manifest["model"], manifest["dims"], manifest.get("max_input_tokens"))
    if theirs != spec.reuse_key():
        log.warning("previous run %s used model/dims/max_input_tokens %s, this run %s: embedding every node",
                    spec.previous, theirs, spec.reuse_key())
        return {}
    wanted = {n.id: n.content_sha256 for n in nodes}
    same_sharding = (manifest["task_count"] == spec.task_count
                     and manifest["format"]["shard_function"] == spec.shard_function)
    # With the same task count and hash, this shard's nodes were all in the same-numbered part.
    indices = [index] if same_sharding else range(manifest["task_count"])
    found: dict[str, np.ndarray] = {}
    for i in indices:
        name = RunLayout(spec.previous).part(i)
        data = store.get(name)
        if data is None:
            raise JobError("previous_run_incomplete", f"{store.uri(name)} is listed in run {spec.previous}'s manifest "
                           "but missing; pass --previous none or name another run")
        rows, _ = decode_rows(data, where=store.uri(name))
        if rows.model != spec.model or rows.dims != spec.dims:
            continue
        for j, (node_id, sha) in enumerate(zip(rows.ids, rows.content_sha256)):
            if wanted.get(node_id) == sha:
                found[node_id] = rows.vectors[j]
    return found
