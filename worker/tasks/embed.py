"""`embed` tasks: texts in, one vector per text out."""
from __future__ import annotations

from schemas.envelope import EmbedTask
from schemas.errors import ErrorCode, TaskError
from schemas.result import EmbedOutput
from worker.engine import Embeddings
from worker.tasks.base import Started, TaskContext


def check(task: EmbedTask, ctx: TaskContext) -> int | None:
    """This worker's limits on the task's parameters (no tokenizing); the `dims` to use."""
    payload = task.payload
    limit = ctx.settings.max_texts_per_task
    if len(payload.texts) > limit:
        raise TaskError(ErrorCode.TOO_MANY_INPUTS,
                        f"{len(payload.texts)} texts in one task; the limit is max_texts_per_task={limit}")
    return ctx.engine.check_dims(payload.dims)


def start(task: EmbedTask, ctx: TaskContext) -> Started:
    payload = task.payload
    dims = check(task, ctx)
    items = ctx.engine.tokenize(payload.texts, truncate=payload.truncate, what="text")
    future = ctx.batcher.submit_embed(items, dims=dims, normalize=payload.normalize)

    def finish(out: Embeddings) -> EmbedOutput:
        return EmbedOutput(embeddings=out.vectors.tolist(), dims=dims, input_tokens=out.input_tokens,
                           truncated=out.truncated)

    return Started(future=future, finish=finish)
