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
# Each kind's limits on its parameters, checked without tokenizing: also before a result-cache lookup,
# so a worker answers from the cache only the tasks it would run itself.
CHECKS: dict[str, Callable[..., object]] = {
    "embed": embed.check,
    "generate": generate.check,
    "graph": graph.check,
    "code": code.check,
}


def check_task(task, ctx: TaskContext) -> None:
    """This worker's limits on the task's kind and parameters (no tokenizing); raises TaskError."""
    _supported(task)
    CHECKS[task.kind](task, ctx)


def start_task(task, ctx: TaskContext) -> Started:
    """Validate and tokenize in the caller's thread, then queue for the engine; raises TaskError."""
    return _supported(task)(task, ctx)


def _supported(task) -> Callable[..., Started]:
    handler = HANDLERS.get(task.kind)
    if handler is None:
        raise TaskError(ErrorCode.UNSUPPORTED_KIND,
                        f"{task.kind!r} tasks are not supported by this worker yet (supported: {', '.join(HANDLERS)})")
    return handler
