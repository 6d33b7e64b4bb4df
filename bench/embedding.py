"""Embedding: our engine against `sentence-transformers` `encode` (batch 32, mean pooling, the same
model directory: the peer a user would pick) and the naive baseline (batches of 32 in input order,
padded to the longest), on the same real texts. Texts/s and tokens/s of each, the cosine between
their vectors, and the share of this machine's compute floor we reach: non-embedding FLOPs per
token x real tokens, over an fp32 matrix-multiply rate measured in the same run on the model's own
layer shapes (just before and just after our run, averaged, since the machine is shared)."""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import attention_flops, embed_texts, flops_per_token, table, timed
from worker.engine import Engine, plan_batches
from worker.model import onednn
from worker.model.source import prepare_model
from worker.settings import Settings

log = logging.getLogger(__name__)


def linear_shapes(engine: Engine) -> list[tuple[int, int]]:
    """(in, out) of every linear layer in the body, in order (the layers the forward pass runs)."""
    return [(m.in_features, m.out_features) for m in engine.model.body.modules() if isinstance(m, torch.nn.Linear)]


def matmul_rate(engine: Engine, *, tokens: int, seconds: float = 3.0,
                kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.linear) -> float:
    """FLOP/s of an fp32 `kernel` (PyTorch's `linear` unless given) over one pass through the
    model's layer shapes, `tokens` rows at a time."""
    shapes = linear_shapes(engine)
    weights = [torch.randn(o, i) for i, o in shapes]
    inputs = {i: torch.randn(tokens, i) for i, _ in shapes}
    flops = sum(2.0 * tokens * i * o for i, o in shapes)
    with torch.inference_mode():
        for (i, _), w in zip(shapes, weights):  # warm
            kernel(inputs[i], w)
        passes, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for (i, _), w in zip(shapes, weights):
                kernel(inputs[i], w)
            passes += 1
        return passes * flops / (time.perf_counter() - started)


def floor_rate(engine: Engine) -> float:
    """The best `matmul_rate` over batch sizes around the engine's budget (at least 1,024 and 2,048
    rows), so the floor does not move with the token budget chosen, and over both fp32 kernels the
    engine may run its linear layers through (PyTorch's `linear` and, where this PyTorch has it,
    oneDNN's: worker/model/onednn.py), so the floor does not move with the kernel chosen either."""
    sizes = sorted({1024, 2048, engine.token_budget})
    kernels = [torch.nn.functional.linear] + ([onednn.linear] if onednn.available() else [])
    return max(matmul_rate(engine, tokens=t, seconds=2.0, kernel=k) for t in sizes for k in kernels)


def run_naive(engine: Engine, texts: list[str], batch: int = 32) -> np.ndarray:
    """Batches of `batch` in input order, each padded to its longest text: what a first attempt does."""
    items = engine.tokenize(texts, truncate=True, what="text")
    vectors = np.concatenate([engine.embed_pass([it.ids for it in items[k: k + batch]])
                              for k in range(0, len(items), batch)])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def sentence_transformer(engine: Engine, settings: Settings) -> Any:
    """sentence-transformers over the model directory the engine loaded, mean pooling, fp32."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    path = prepare_model(settings.model, settings.cache_dir).path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(str(path), max_seq_length=engine.max_input_tokens,
                                  model_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
        return SentenceTransformer(modules=[transformer, Pooling(engine.width, "mean")], device="cpu")


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def measure(engine: Engine, settings: Settings, *, n: int, peer: bool = True) -> dict[str, Any]:
    texts = embed_texts(n)
    lengths = [len(t.ids) for t in engine.tokenize(texts, truncate=True, what="text")]
    tokens = sum(lengths)
    log.info("embedding: %d texts, %d tokens", n, tokens)
    engine.embed(texts[:8], truncate=True)  # warm
    # The floor's rate is measured just before and just after our run, not across the peers' runs
    # (25 minutes at full size on 2 cores), over which this shared machine's speed drifts.
    rate_before = floor_rate(engine)
    ours = timed(lambda: engine.embed(texts, truncate=True).vectors)
    rate_after = floor_rate(engine)
    naive = timed(lambda: run_naive(engine, texts))
    result: dict[str, Any] = {"texts": n, "tokens": tokens, "token_budget": engine.token_budget,
                              "ours": {"seconds": ours.seconds}, "naive_batches_of_32": {"seconds": naive.seconds},
                              "cosine_min_vs_naive": cosine_min(ours.value, naive.value)}
    if peer:
        st = sentence_transformer(engine, settings)
        st.encode(texts[:8], batch_size=32)  # warm
        peer_run = timed(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True))
        result["sentence_transformers"] = {"seconds": peer_run.seconds}
        result["cosine_min_vs_sentence_transformers"] = cosine_min(ours.value, np.asarray(peer_run.value))
        del st
    for key in ("ours", "naive_batches_of_32", "sentence_transformers"):
        if key in result:
            result[key]["texts_per_s"] = n / result[key]["seconds"]
            result[key]["tokens_per_s"] = tokens / result[key]["seconds"]
    fpt = flops_per_token(engine)
    rate = (rate_before + rate_after) / 2
    attention = attention_flops(engine, lengths)
    floor, with_attention = tokens * fpt / rate, (tokens * fpt + attention) / rate
    result["compute_floor"] = {"flops_per_token": fpt, "matmul_flops_per_s": rate,
                               "matmul_runs_flops_per_s": [rate_before, rate_after],
                               "floor_seconds": floor, "fraction_reached": floor / ours.seconds,
                               "attention_flops": attention, "floor_seconds_with_attention": with_attention,
                               "fraction_reached_with_attention": with_attention / ours.seconds}
    result["ratio_vs_naive"] = naive.seconds / ours.seconds
    if "sentence_transformers" in result:
        result["ratio_vs_sentence_transformers"] = result["sentence_transformers"]["seconds"] / ours.seconds
    return result


def compiled(engine: Engine, *, n: int) -> dict[str, Any]:
    """`--compile` against the eager forward pass on the same texts, in this run: compile time,
    speed-up, agreement, and the share of the compute floor each reaches. The engine is left eager."""
    texts = embed_texts(n)
    lengths = [len(t.ids) for t in engine.tokenize(texts, truncate=True, what="text")]
    tokens = sum(lengths)
    eager = timed(lambda: engine.embed(texts, truncate=True).vectors)
    compile_seconds = engine.compile_embedding()
    try:
        run = timed(lambda: engine.embed(texts, truncate=True).vectors)
    finally:
        engine._compiled_forward = None
    rate = floor_rate(engine)
    floor = tokens * flops_per_token(engine) / rate
    with_attention = floor + attention_flops(engine, lengths) / rate
    return {"texts": n, "tokens": tokens, "compile_seconds": compile_seconds, "eager_seconds": eager.seconds,
            "compiled_seconds": run.seconds, "speedup": eager.seconds / run.seconds,
            "cosine_min_vs_eager": cosine_min(run.value, eager.value), "floor_seconds": floor,
            "eager_fraction_reached": floor / eager.seconds, "fraction_reached": floor / run.seconds,
            "floor_seconds_with_attention": with_attention,
            "eager_fraction_reached_with_attention": with_attention / eager.seconds,
            "fraction_reached_with_attention": with_attention / run.seconds}


def render_compiled(r: dict[str, Any]) -> str:
    return (f"EMBEDDING WITH --compile: {r['texts']} texts, {r['tokens']} tokens\n"
            + table(["measure", "value"], [
                ["compiling at startup, s", r["compile_seconds"]],
                ["eager, s (share of floor; counting attention)",
                 f"{r['eager_seconds']:.1f} ({r['eager_fraction_reached']:.0%}; {r['eager_fraction_reached_with_attention']:.0%})"],
                ["compiled, s (share of floor; counting attention)",
                 f"{r['compiled_seconds']:.1f} ({r['fraction_reached']:.0%}; {r['fraction_reached_with_attention']:.0%})"],
                ["speed-up", f"{r['speedup']:.2f}x"],
                ["cosine, compiled vs eager, min", f"{r['cosine_min_vs_eager']:.6f}"]]))


def sweep(engine: Engine, *, n: int, budgets: list[int], overheads: list[int]) -> list[dict[str, Any]]:
    """Tokens/s of our batching for each token budget and per-batch overhead, on the same texts:
    the measurement the CPU defaults (engine.default_token_budget, engine.BATCH_OVERHEAD) come from.
    The texts are embedded once before the timed runs, so no setting pays for warming up."""
    texts = embed_texts(n)
    items = engine.tokenize(texts, truncate=True, what="text")
    tokens = sum(len(it.ids) for it in items)
    engine.embed_tokenized(items)
    rows = []
    for budget in budgets:
        for overhead in overheads:
            plan = plan_batches([len(it.ids) for it in items], token_budget=budget,
                                max_batch_size=engine.max_batch_size, batch_overhead=overhead)
            run = timed(lambda: [engine.embed_pass([items[i].ids for i in b]) for b in plan])
            padded = sum(max(len(items[i].ids) for i in b) * len(b) for b in plan)
            rows.append({"token_budget": budget, "batch_overhead": overhead, "batches": len(plan),
                         "padding": 1 - tokens / padded, "tokens_per_s": tokens / run.seconds})
    return rows


def render(r: dict[str, Any]) -> str:
    ours = r["ours"]
    rows = [["ours (token-budget batches)", ours["texts_per_s"], ours["tokens_per_s"], r["ours"]["seconds"], "1.00"]]
    for key, label in (("sentence_transformers", "sentence-transformers encode, batch 32"),
                       ("naive_batches_of_32", "input-order batches of 32")):
        if key in r:
            rows.append([label, r[key]["texts_per_s"], r[key]["tokens_per_s"], r[key]["seconds"],
                         f"{r[key]['seconds'] / ours['seconds']:.2f}x"])
    f = r["compute_floor"]
    lines = [f"EMBEDDING: {r['texts']} texts, {r['tokens']} tokens, token budget {r['token_budget']}",
             table(["contender", "texts/s", "tokens/s", "seconds", "ours is"], rows),
             f"  compute floor: {f['flops_per_token'] / 1e6:.0f} MFLOP/token x {r['tokens']} tokens at "
             f"{f['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (the faster fp32 linear on the model's shapes) = "
             f"{f['floor_seconds']:.1f} s; ours reaches {f['fraction_reached']:.0%} of it "
             f"({f['fraction_reached_with_attention']:.0%} counting attention's {f['attention_flops'] / 1e12:.2f} "
             "TFLOP at the same rate)",
             f"  cosine, ours vs naive: min {r['cosine_min_vs_naive']:.6f}"]
    if "cosine_min_vs_sentence_transformers" in r:
        lines.append(f"  cosine, ours vs sentence-transformers: min {r['cosine_min_vs_sentence_transformers']:.6f}")
    return "\n".join(lines)


def render_sweep(rows: list[dict[str, Any]]) -> str:
    return "EMBEDDING BATCH SWEEP\n" + table(
        ["token budget", "batch overhead", "batches", "padding", "tokens/s"],
        [[r["token_budget"], r["batch_overhead"], r["batches"], f"{r['padding']:.1%}", r["tokens_per_s"]] for r in rows])
