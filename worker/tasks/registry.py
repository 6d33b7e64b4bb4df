"""Which handler runs which kind."""
from __future__ import annotations

from collections.abc import Callable

from schemas.errors import ErrorCode, TaskError
from worker.tasks import code, embed, generate, graph
from worker.tasks.base import Started, TaskContext

HANDLERS: dict[str, Callable[..., Started]] = {
    "embed": embed.start,
    "generate": generate.start,
    "graph": graph.start,
    "code": code.start,
}


def start_task(task, ctx: TaskContext) -> Started:
    """Validate and tokenize in the caller's thread, then queue for the engine; raises TaskError."""
    handler = HANDLERS.get(task.kind)
    if handler is None:
        raise TaskError(ErrorCode.UNSUPPORTED_KIND,
                        f"{task.kind!r} tasks are not supported by this worker yet (supported: {', '.join(HANDLERS)})")
    return handler(task, ctx)
