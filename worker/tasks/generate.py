"""`generate` tasks: a prompt in, a completion out."""
from __future__ import annotations

from schemas.envelope import GenerateTask
from schemas.result import GenerateOutput
from worker.engine import Generation
from worker.tasks.base import Started, TaskContext


def start(task: GenerateTask, ctx: TaskContext) -> Started:
    p = task.payload
    stops = ctx.engine.check_generate_args(max_new_tokens=p.max_tokens, temperature=p.temperature,
                                           top_p=p.top_p, stop=p.stop)
    items = ctx.engine.tokenize([p.prompt], truncate=p.truncate, limit=ctx.engine.prompt_limit(p.max_tokens),
                                what="prompt")
    future = ctx.batcher.submit_generate(items, max_new_tokens=p.max_tokens, temperature=p.temperature,
                                         top_p=p.top_p, stop=stops, seed=p.seed)

    def finish(out: list[Generation]) -> GenerateOutput:
        g = out[0]
        return GenerateOutput(text=g.text, finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
                              completion_tokens=len(g.token_ids), truncated=g.truncated)

    return Started(future=future, finish=finish)
