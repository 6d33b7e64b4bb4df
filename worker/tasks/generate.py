"""`generate` tasks: a prompt in, a completion out; with `response_schema`, JSON of that schema."""
from __future__ import annotations

from schemas.envelope import GenerateTask
from schemas.errors import ErrorCode, TaskError
from schemas.result import GenerateOutput
from worker.engine import Generation
from worker.tasks.base import Started, TaskContext


def check(task: GenerateTask, ctx: TaskContext) -> list[str]:
    """This worker's limits on the task's parameters (no tokenizing); the stop strings to use."""
    p = task.payload
    return ctx.engine.check_generate_args(max_new_tokens=p.max_tokens, temperature=p.temperature,
                                          top_p=p.top_p, stop=p.stop)


def start(task: GenerateTask, ctx: TaskContext) -> Started:
    p = task.payload
    stops = check(task, ctx)
    # Compiled here, before the batch: a malformed schema fails this task alone, at once.
    schema = None if p.response_schema is None else ctx.engine.check_response_schema(p.response_schema, stop=stops)
    items = ctx.engine.tokenize([p.prompt], truncate=p.truncate, limit=ctx.engine.prompt_limit(p.max_tokens),
                                what="prompt")
    future = ctx.batcher.submit_generate(items, max_new_tokens=p.max_tokens, temperature=p.temperature,
                                         top_p=p.top_p, stop=stops, seed=p.seed, response_schema=p.response_schema)

    def finish(out: list[Generation]) -> GenerateOutput:
        g = out[0]
        if schema is not None:
            if g.finish_reason == "length":
                raise TaskError(ErrorCode.OUTPUT_TRUNCATED, (
                    f"max_tokens={p.max_tokens} ran out before the JSON of response_schema was complete; "
                    "raise max_tokens or bound the schema (maxItems, maxLength)"))
            schema.parse(g.text)
        return GenerateOutput(text=g.text, finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
                              completion_tokens=len(g.token_ids), truncated=g.truncated)

    return Started(future=future, finish=finish)
