"""A lossy opt-in (`--quantize int8`, `int4` or `bf16`, CPU) against the exact fp32 engine, in one
process on the same inputs: its speed-up and its quality cost (embedding cosine to the fp32 vectors;
greedy outputs identical token for token, and the share of tokens before the first difference), and
the share of the fp32 compute floor (bench/embedding.py) each embedding run reaches."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from bench import generation, rss
from bench.common import embed_texts, flops_per_token, table, timed
from bench.embedding import floor_rate
from worker.engine import Engine, build_engine
from worker.settings import Settings


def measure(engine: Engine, settings: Settings, *, texts: int, prompts: int, max_new_tokens: int = 64,
            mode: str = "int8", process_prompts: int | None = None) -> dict[str, Any]:
    """`process_prompts`: how many of the generation section's prompts the fresh processes that
    measure peak RSS and build time generate for (default `prompts`)."""
    lossy = build_engine(replace(settings, quantize=mode))
    docs = embed_texts(texts)
    items = generation.prompts(engine, prompts)
    for e in (engine, lossy):  # warm
        e.embed(docs[:8], truncate=True)
    tokens = sum(len(t.ids) for t in engine.tokenize(docs, truncate=True, what="text"))
    rate_before = floor_rate(engine)
    exact_embed = timed(lambda: engine.embed(docs, truncate=True).vectors)
    lossy_embed = timed(lambda: lossy.embed(docs, truncate=True).vectors)
    floor = tokens * flops_per_token(engine) / ((rate_before + floor_rate(engine)) / 2)
    exact_gen = timed(lambda: engine.generate_tokenized(items, max_new_tokens=max_new_tokens))
    lossy_gen = timed(lambda: lossy.generate_tokenized(items, max_new_tokens=max_new_tokens))
    cos = np.sum(exact_embed.value * lossy_embed.value, axis=1)
    a = generation.agreement([g.token_ids for g in lossy_gen.value], [g.token_ids for g in exact_gen.value])
    common = [generation.shared_prefix(x.token_ids, y.token_ids) / max(len(x.token_ids), 1)
              for x, y in zip(exact_gen.value, lossy_gen.value)]
    out_tokens = sum(len(g.token_ids) for g in exact_gen.value), sum(len(g.token_ids) for g in lossy_gen.value)
    n = process_prompts or prompts
    memory = {"fp32": rss.measure(None, prompts=n), mode: rss.measure(mode, prompts=n)}
    return {"mode": mode, "texts": texts, "prompts": prompts, "max_new_tokens": max_new_tokens,
            "embed_seconds": {"fp32": exact_embed.seconds, mode: lossy_embed.seconds},
            "embed_speedup": exact_embed.seconds / lossy_embed.seconds,
            "embed_floor_seconds": floor,
            "embed_share_of_floor": {"fp32": floor / exact_embed.seconds, mode: floor / lossy_embed.seconds},
            "embed_cosine": {"mean": float(cos.mean()), "min": float(cos.min()), "p10": float(np.percentile(cos, 10))},
            "generate_tokens_per_s": {"fp32": out_tokens[0] / exact_gen.seconds, mode: out_tokens[1] / lossy_gen.seconds},
            "generate_speedup": (out_tokens[1] / lossy_gen.seconds) / (out_tokens[0] / exact_gen.seconds),
            "greedy_identical": a["identical"], "greedy_mean_shared_prefix": float(np.mean(common)),
            "generate_process": {"prompts": n, **memory}}


def render(r: dict[str, Any]) -> str:
    g, mode = r["generate_tokens_per_s"], r.get("mode", "int8")
    return (f"{mode.upper()} (--quantize {mode}, lossy) against fp32: {r['texts']} texts, {r['prompts']} prompts x "
            f"{r['max_new_tokens']} new tokens\n"
            + table(["measure", "fp32", mode, f"{mode} is"], [
                ["embed seconds", r["embed_seconds"]["fp32"], r["embed_seconds"][mode], f"{r['embed_speedup']:.2f}x faster"],
                *([["embed, share of the fp32 compute floor", f"{f['fp32']:.0%}", f"{f[mode]:.0%}", ""]]
                  if (f := r.get("embed_share_of_floor")) else []),
                ["generate tokens/s", g["fp32"], g[mode], f"{r['generate_speedup']:.2f}x faster"],
                *([[f"fresh process, {m['prompts']} prompts: build s", m["fp32"]["build_s"], m[mode]["build_s"], ""],
                   [f"fresh process, {m['prompts']} prompts: peak RSS, GB", m["fp32"]["peak_rss_bytes"] / 1e9, m[mode]["peak_rss_bytes"] / 1e9, ""]]
                  if (m := r.get("generate_process")) else [])])
            + f"\n  quality cost: embedding cosine to fp32 mean {r['embed_cosine']['mean']:.4f}, "
              f"10th percentile {r['embed_cosine']['p10']:.4f}, min {r['embed_cosine']['min']:.4f}; greedy outputs "
              f"identical {r['greedy_identical']} of {r['prompts']}, on average the first "
              f"{r['greedy_mean_shared_prefix']:.0%} of tokens shared")
