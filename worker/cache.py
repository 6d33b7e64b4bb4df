"""The result cache: a task identical to one already answered (same model, kind, parameters and
input) gets that answer again instead of another engine call.

Entries are create-only objects `_cache/{key}.json` in the results store, beside the results, so
every worker writing to one results location shares them; they are never deleted (no TTL). The
cache is an optimisation only: a store error on its path never fails a task (a failed read is a
miss, a failed write a log line)."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.envelope import CodeTask, EmbedTask, GenerateTask, GraphTask
from schemas.result import CodeOutput, EmbedOutput, GenerateOutput, GraphOutput, Result, ResultStatus
from worker.store import Store

log = logging.getLogger(__name__)

CACHE_PREFIX = "_cache"  # cannot clash with a batch: batch ids start with a letter or digit
KEY_VERSION = 1  # bump when an output's meaning changes, so older entries stop matching

AnyTask = EmbedTask | GenerateTask | GraphTask | CodeTask


class CacheEntry(BaseModel):
    """What a cache object holds: enough to write another task's result without the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    kind: str
    model: str
    output: EmbedOutput | GenerateOutput | GraphOutput | CodeOutput
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def engine_facts(engine: Any) -> dict[str, Any]:
    """What besides the model name changes an engine's answers: the dtype (bf16 on a GPU and fp32 on
    a CPU give slightly different numbers) and the input limit (where `truncate` cuts, how long chunks are)."""
    return {"dtype": str(engine.model.placement.dtype), "max_input_tokens": engine.max_input_tokens}


def cache_key(model_name: str, task: AnyTask, *, facts: Mapping[str, Any] | None = None) -> str | None:
    """sha256 of the canonical JSON of model, kind, and the payload with its defaults filled in;
    None when the answer is not reproducible (sampling without a seed). Ids and timestamps are left
    out, so the same request under another task id has the same key."""
    payload = task.payload.model_dump(mode="json")
    if isinstance(task, GenerateTask):
        if task.payload.temperature > 0 and task.payload.seed is None:
            return None
        if task.payload.temperature == 0:
            # Greedy decoding reads neither: they must not split one answer into several entries.
            payload.update(seed=None, top_p=1.0)
    canonical = {"v": KEY_VERSION, "model": model_name, "kind": task.kind, "payload": payload,
                 "engine": dict(facts or {})}
    # ensure_ascii: a lone surrogate (valid in JSON input) would not encode as UTF-8.
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def cache_name(key: str) -> str:
    return f"{CACHE_PREFIX}/{key}.json"


class ResultCache:
    """Lookups and fills over the results store for one engine. Neither method raises."""

    def __init__(self, store: Store, *, model_name: str, facts: Mapping[str, Any]) -> None:
        self.store = store
        self.model_name = model_name
        self.facts = dict(facts)

    def key_for(self, task: AnyTask) -> str | None:
        """The task's key, or None when it must run: it opted out, or its answer is not reproducible."""
        if not task.cache:
            return None
        return cache_key(self.model_name, task, facts=self.facts)

    def get(self, key: str, *, task_id: str) -> CacheEntry | None:
        """The entry under key, or None: absent, unreadable, or the store failed (then the task just runs)."""
        try:
            data = self.store.get(cache_name(key))
        except Exception as exc:  # noqa: BLE001 - any store failure is a miss, never a failed task
            log.warning("cache read failed, running the task: %s", getattr(exc, "message", exc),
                        extra={"task_id": task_id})
            return None
        if data is None:
            return None
        try:
            entry = CacheEntry.model_validate_json(data)
        except ValidationError as exc:
            log.warning("cache entry %s is unreadable, running the task: %s", cache_name(key),
                        exc.errors(include_url=False)[0]["msg"], extra={"task_id": task_id})
            return None
        return entry if entry.key == key else None

    def put(self, key: str, result: Result) -> None:
        """Remember an OK result under key, create-only: a racing worker's identical entry wins just as well."""
        if result.status is not ResultStatus.OK or result.output is None or result.cached:
            return
        entry = CacheEntry(key=key, kind=result.kind or "", model=result.model or self.model_name,
                           output=result.output)
        try:
            self.store.put_if_absent(cache_name(key), entry.model_dump_json().encode())
        except Exception as exc:  # noqa: BLE001 - the result is written; a lost entry costs one later run
            log.warning("cache write failed, result kept: %s", getattr(exc, "message", exc),
                        extra={"task_id": result.task_id})
