"""Running tasks the way the worker does: envelopes through a Runner with a real batcher and a
local store, all submitted before any is awaited so they share engine calls."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from schemas.export import SCHEMA_DIR
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
