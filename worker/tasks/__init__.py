"""One module per task kind: validate and tokenize the payload, hand it to the batcher, and turn
the engine's answer into the kind's output. `start_task` is the one entry the runner uses;
`check_task` checks a task against this worker's limits alone (before a result-cache lookup)."""
from __future__ import annotations

from worker.tasks.base import Started, TaskContext
from worker.tasks.registry import check_task, start_task

__all__ = ["Started", "TaskContext", "check_task", "start_task"]
