"""How far a run is, from the objects it has written, and how that is shown.

Progress is read back from storage (plans and chunk checkpoints), never from a task's memory,
so it stays right across retries, kills and task processes that the reader did not start.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TextIO

from jobs.parts import RunLayout, chunk_shard, chunk_start, record_shard
from worker.store import Store


@dataclass(frozen=True)
class RunCounts:
    done: int  # rows of written shards, and rows whose chunk checkpoint exists
    total: int | None  # None until every task has planned its shard
    shards_done: int


def run_counts(store: Store, *, run_id: str, task_count: int) -> RunCounts:
    layout = RunLayout(run_id)
    plans = {name: json.loads(store.get(name) or b"{}") for name in store.list(layout.plans_prefix)}
    rows = {record_shard(name): p.get("rows", 0) for name, p in plans.items()}
    chunk_rows = next((p["chunk_rows"] for p in plans.values() if "chunk_rows" in p), 1)
    finished = shards_written(store, layout)
    done = sum(rows.get(index, 0) for index in finished)  # a written shard's chunks are deleted
    for name in store.list(layout.chunks_prefix):
        index = chunk_shard(name)
        if index not in finished:
            start = chunk_start(name)
            done += max(0, min(start + chunk_rows, rows.get(index, start + chunk_rows)) - start)
    total = sum(rows.values()) if len(rows) >= task_count else None
    return RunCounts(done=done, total=total, shards_done=len(finished))


def shards_written(store: Store, layout: RunLayout) -> set[int]:
    """Indexes of the shards whose counts are written (their part follows; their chunks go)."""
    return {record_shard(name) for name in store.list(layout.shard_stats_prefix)}


class RateMeter:
    """Rows per second and time left, over the rows done since the meter started."""

    def __init__(self, *, total: int | None, done: int = 0) -> None:
        self.total = total
        self.base = done
        self.started = time.monotonic()

    def describe(self, done: int, *, total: int | None = None) -> dict[str, float | int | None]:
        total = self.total if total is None else total
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (done - self.base) / elapsed
        eta = (total - done) / rate if total is not None and rate > 0 else None
        return {"done": done, "total": total, "rows_per_s": round(rate, 2),
                "eta_s": None if eta is None else round(eta, 1)}


def describe_line(numbers: dict[str, float | int | None]) -> str:
    total = numbers["total"]
    if total is None:
        return f"{numbers['done']} rows so far; waiting for every task to load the model and plan its shard"
    share = f" ({100 * numbers['done'] / total:.0f}%)" if total else ""
    eta = f", ETA {numbers['eta_s']:.0f}s" if numbers["eta_s"] is not None else ""
    return f"{numbers['done']}/{total} rows{share}, {numbers['rows_per_s']:.1f} rows/s{eta}"


class ProgressView:
    """A one-line bar on a terminal; otherwise a JSON log line every `interval_s` (Cloud Run has no TTY).

    The log lines are written directly, not through `logging`, so they appear at any log level."""

    def __init__(self, *, stream: TextIO | None = None, interval_s: float = 5.0, label: str = "reembed",
                 fields: dict[str, object] | None = None, start: tuple[int, int] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s
        self.label = label
        self.fields = fields or {}
        self.meter = RateMeter(done=start[0], total=start[1]) if start else None  # (done, total) known upfront
        self.last_log = 0.0
        self.logged = -1  # rows at the last log line; the line that reaches the total is always written

    def update(self, done: int, total: int | None, *, force: bool = False) -> None:
        if self.meter is None and total is not None:
            # Totals are known once every task has loaded the model and planned its shard; the
            # rate counts from then, so model loading does not skew rows/s and ETA.
            self.meter = RateMeter(total=total, done=done)
        numbers = (self.meter.describe(done, total=total) if self.meter else
                   {"done": done, "total": None, "rows_per_s": 0.0, "eta_s": None})
        if self.tty:
            filled = int(30 * done / total) if total else 0
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {describe_line(numbers)}   ")
            self.stream.flush()
        elif force or time.monotonic() - self.last_log >= self.interval_s or (total and done >= total > self.logged):
            self.logged = done
            self.last_log = time.monotonic()
            entry = {"severity": "INFO", "message": f"{self.label} progress: {describe_line(numbers)}",
                     "time": datetime.now(timezone.utc).isoformat(), **self.fields, **numbers}
            self.stream.write(json.dumps(entry) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
