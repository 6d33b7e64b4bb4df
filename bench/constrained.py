"""Constrained (JSON Schema) against unconstrained decoding, on the same prompts in one run.

    python -m bench.constrained                  # 8 graph-extraction prompts, 192 new tokens
    python -m bench.constrained --docs 4 --max-tokens 96 --backends xgrammar,llguidance
    python -m bench.constrained --docs 10 --max-tokens 150 --routes 2   # merged decoder against `generate`

Measured in one process, one after another, on the engine the settings build: the unconstrained
batch (the baseline), then the same prompts under the `GraphChunk` schema (worker/constrained.py,
xgrammar). Prints tokens/s of each and their ratio, and how many constrained outputs parse and
validate. `--backends` then replays the constrained outputs' tokens through each grammar library
named (mask fill, mask apply and token accept per step, the per-token work a backend adds to
decoding; compile and tokenizer set-up times; whether it accepts the valid sequences and rejects a
corrupted one), so libraries are compared on identical token streams. `--routes N` then times the
constrained prompts through the merged decoder (greedy constrained rows' route, drafts included)
against `generate` batches (their route before), alternating, N times each, tokens compared.
JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from schemas.graph import GraphChunk
from worker.corpus import stdlib_docstrings
from worker.engine import Engine, build_engine
from worker.settings import Settings
from worker.tasks.graph import GRAPH_SCHEMA, render_prompt

RESULTS = Path(__file__).parent / "results"


def prompts(n: int) -> list[str]:
    docs = stdlib_docstrings(n, min_chars=150, max_chars=500)
    return [render_prompt(" ".join(d.split()), title=None) for d in docs]


def decode(engine: Engine, texts: list[str], *, max_tokens: int, schema: dict | None) -> dict[str, Any]:
    started = time.monotonic()
    out = engine.generate(texts, max_new_tokens=max_tokens, response_schema=schema)
    seconds = time.monotonic() - started
    tokens = sum(len(g.token_ids) for g in out)
    valid = 0
    for g in out:
        try:
            GraphChunk.model_validate_json(g.text)
            valid += g.finish_reason == "stop"
        except ValidationError:
            pass
    # Time per token of the longest row (a decode step each through `generate`, fewer steps with the
    # merged decoder's drafts): the grammar's cost apart from how many rows ended early.
    steps = max(len(g.token_ids) for g in out)
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "steps": steps, "ms_per_step": round(seconds / max(steps, 1) * 1000, 1),
            "valid": valid, "rows": len(out), "truncated": sum(g.finish_reason == "length" for g in out),
            "token_ids": [g.token_ids for g in out]}


def routes(engine: Engine, texts: list[str], *, max_tokens: int, repeats: int) -> dict[str, Any]:
    """The constrained prompts through the merged decoder and through `generate` batches, alternately
    (generate, merged, merged, generate, ...): seconds of each run, the best's ratio, identical rows."""
    from bench.common import alternating
    from bench.generation import generate_batches

    items = engine.tokenize(texts, truncate=False, what="prompt")
    grammar = engine.check_response_schema(GRAPH_SCHEMA)
    decoder = engine.decoder

    drafts: dict[str, int] = {}

    def merged() -> list[list[int]]:
        before = decoder.drafted, decoder.accepted, decoder.steps
        out = [g.token_ids for g in engine.generate_tokenized(items, max_new_tokens=max_tokens,
                                                              response_schema=GRAPH_SCHEMA)]
        drafts.update(zip(("drafted", "accepted", "steps"),
                          (a - b for a, b in zip((decoder.drafted, decoder.accepted, decoder.steps), before))))
        return out

    def batches() -> list[list[int]]:
        return generate_batches(engine, items, max_new_tokens=max_tokens, grammar=grammar)

    seconds, outs = alternating({"generate": batches, "merged": merged}, repeats)
    times = {name: [round(t, 2) for t in runs] for name, runs in seconds.items()}
    return {"generate_seconds": times["generate"], "merged_seconds": times["merged"],
            "speedup": round(min(times["generate"]) / min(times["merged"]), 3),
            "identical": sum(a == b for a, b in zip(outs["merged"], outs["generate"])), "rows": len(items),
            "tokens": sum(map(len, outs["merged"])), "merged_drafts": drafts}


class XGrammarRows:
    """The library worker/constrained.py uses, driven the way GrammarRows drives it."""

    def __init__(self, engine: Engine) -> None:
        import xgrammar as xgr

        from worker.constrained import SchemaGrammars

        self.xgr = xgr
        self.vocab_size = engine.grammars.vocab_size
        self.grammars = SchemaGrammars(engine.tokenizer, vocab_size=self.vocab_size, stop_token_ids=engine.eos_ids)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, schema: dict) -> None:
        self.compiled = self.grammars.compile(schema).grammar

    def matchers(self, n: int) -> list[Any]:
        self.bitmask = self.xgr.allocate_token_bitmask(n, self.vocab_size)
        return [self.xgr.GrammarMatcher(self.compiled) for _ in range(n)]

    def mask(self, rows: list[Any], live: list[int], logits: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask([rows[i] for i in live], self.bitmask, indices=live)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask, indices=live)

    def accept(self, row: Any, token: int) -> bool:
        return row.accept_token(token)

    def accepting(self, row: Any) -> bool:
        return row.is_completed() or row.is_terminated()


class LLGuidanceRows:
    """llguidance (the Rust engine behind Guidance, also in vLLM), with the same compact separators."""

    def __init__(self, engine: Engine) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.llg_torch = llguidance, llguidance.torch
        self.vocab_size = engine.grammars.vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(engine.tokenizer, n_vocab=self.vocab_size,
                                                      eos_token=sorted(engine.eos_ids)[0])

    def compile(self, schema: dict) -> None:
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        self.grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        self.llg.LLMatcher(self.tokenizer, self.grammar)  # compiles lazily: build one so errors show here

    def matchers(self, n: int) -> list[Any]:
        self.bitmask = self.llg_torch.allocate_token_bitmask(n, self.vocab_size)
        return [self.llg.LLMatcher(self.tokenizer, self.grammar) for _ in range(n)]

    def mask(self, rows: list[Any], live: list[int], logits: torch.Tensor) -> None:
        for i in live:
            self.llg_torch.fill_next_token_bitmask(rows[i], self.bitmask, i)
        self.llg_torch.apply_token_bitmask_inplace(logits, self.bitmask)

    def accept(self, row: Any, token: int) -> bool:
        return row.consume_token(token) and not row.is_error()

    def accepting(self, row: Any) -> bool:
        return row.is_accepting() or row.is_stopped()


BACKENDS = {"xgrammar": XGrammarRows, "llguidance": LLGuidanceRows}


def replay(backend: str, engine: Engine, streams: list[list[int]]) -> dict[str, Any]:
    """Per-token grammar work of one library over fixed token streams, batched like decoding."""
    started = time.monotonic()
    factory = BACKENDS[backend](engine)
    setup_s = time.monotonic() - started
    started = time.monotonic()
    factory.compile(GRAPH_SCHEMA)
    compile_s = time.monotonic() - started
    rows = factory.matchers(len(streams))
    logits = torch.randn(len(streams), factory.vocab_size)
    steps = max(len(s) for s in streams)
    started = time.monotonic()
    accepted = [True] * len(streams)
    for step in range(steps):
        live = [i for i, s in enumerate(streams) if step < len(s) and accepted[i]]
        factory.mask(rows, live, logits)
        for i in live:
            accepted[i] = factory.accept(rows[i], streams[i][step])
    seconds = time.monotonic() - started
    tokens = sum(len(s) for s in streams)
    complete = sum(bool(ok) and factory.accepting(row) for ok, row in zip(accepted, rows))
    corrupt = factory.matchers(1)[0]
    bad = streams[0][:3] + [engine.tokenizer.convert_tokens_to_ids("}")] * 2
    rejects = not all(factory.accept(corrupt, t) for t in bad)
    return {"setup_s": round(setup_s, 2), "compile_s": round(compile_s, 3),
            "us_per_token": round(seconds / tokens * 1e6, 1), "tokens": tokens,
            "accepted_complete": f"{complete}/{len(streams)}", "rejects_corrupt": rejects}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--token-budget", type=int, default=None, help="padded tokens per forward batch")
    parser.add_argument("--backends", default="", help="comma-separated: xgrammar,llguidance")
    parser.add_argument("--routes", type=int, default=0,
                        help="time the merged decoder against `generate` batches, this many times each")
    args = parser.parse_args()
    engine = build_engine(Settings(device="cpu", token_budget=args.token_budget))
    texts = prompts(args.docs)
    started = time.monotonic()
    engine.check_response_schema(GRAPH_SCHEMA)
    setup_s = time.monotonic() - started
    engine.generate(texts[:1], max_new_tokens=2)  # warm-up: lazy initialisation is not decoding
    plain = decode(engine, texts, max_tokens=args.max_tokens, schema=None)
    constrained = decode(engine, texts, max_tokens=args.max_tokens, schema=GRAPH_SCHEMA)
    ratio = constrained["tokens_per_s"] / plain["tokens_per_s"]
    step_ratio = constrained["ms_per_step"] / plain["ms_per_step"]
    print(f"prompts: {len(texts)} graph extractions, max_tokens={args.max_tokens}, "
          f"token_budget={engine.token_budget}, device={engine.device}, torch threads={torch.get_num_threads()}")
    print(f"grammar set-up (tokenizer info + compile, once): {setup_s:.2f} s")
    print(f"unconstrained: {plain['tokens']} tokens in {plain['seconds']} s = {plain['tokens_per_s']} tokens/s, "
          f"{plain['ms_per_step']} ms/step over {plain['steps']} steps "
          f"({plain['valid']}/{plain['rows']} parse as GraphChunk)")
    print(f"constrained:   {constrained['tokens']} tokens in {constrained['seconds']} s = "
          f"{constrained['tokens_per_s']} tokens/s, {constrained['ms_per_step']} ms/step over {constrained['steps']} steps "
          f"({constrained['valid']}/{constrained['rows']} parse and validate, {constrained['truncated']} truncated)")
    print(f"ratio constrained/unconstrained: tokens/s {ratio:.3f}, time per decode step {step_ratio:.3f}")
    backends = {}
    streams = [ids for ids in constrained["token_ids"] if ids]
    for name in filter(None, args.backends.split(",")):
        backends[name] = replay(name, engine, streams)
        print(f"backend {name}: {backends[name]}")
    compared = routes(engine, texts, max_tokens=args.max_tokens, repeats=args.routes) if args.routes else None
    if compared is not None:
        print(f"constrained through the merged decoder {compared['merged_seconds']} s against `generate` batches "
              f"{compared['generate_seconds']} s: {compared['speedup']:.2f}x, identical {compared['identical']} of "
              f"{compared['rows']} ({compared['tokens']} tokens; merged drafts {compared['merged_drafts']})")
    report = {"machine": platform.platform(), "prompts": len(texts), "max_tokens": args.max_tokens,
              "token_budget": engine.token_budget, "setup_s": round(setup_s, 2),
              "unconstrained": {k: v for k, v in plain.items() if k != "token_ids"},
              "constrained": {k: v for k, v in constrained.items() if k != "token_ids"},
              "ratio": round(ratio, 3), "step_time_ratio": round(step_ratio, 3), "backends": backends,
              "routes": compared}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"constrained-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
