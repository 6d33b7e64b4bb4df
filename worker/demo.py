"""`make demo`: the main job on the embedded default, with real inputs, reporting what it did."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from worker.corpus import stdlib_docstrings
from worker.engine import build_engine
from worker.settings import Settings

DEMO_PROMPTS = [
    "The Python standard library module `json` is used to",
    "A knowledge graph is",
    "def is_prime(n: int) -> bool:",
    "Cloud Run scales to zero, which means",
]


def run_engine_demo(settings: Settings, *, n_texts: int, echo: Callable[[str], None]) -> None:
    """Embed a real corpus and complete a few prompts, then print counts, speed and a sanity check."""
    started = time.monotonic()
    engine = build_engine(settings)
    echo(f"model {engine.name} on {engine.model.placement.device} ({engine.model.placement.dtype}), "
         f"loaded in {time.monotonic() - started:.1f}s")

    texts = stdlib_docstrings(n_texts, max_chars=2000)
    t0 = time.monotonic()
    out = engine.embed(texts)
    seconds = time.monotonic() - t0
    tokens = sum(out.input_tokens)
    echo(f"embedded {len(texts)} standard-library docstrings ({tokens} tokens) in {seconds:.1f}s: "
         f"{len(texts) / seconds:.1f} texts/s, {tokens / seconds:.0f} tokens/s, {out.vectors.shape[1]} dims")
    sims = out.vectors @ out.vectors[0]
    nearest = int(np.argsort(-sims)[1])
    echo(f"  nearest neighbour of text 0 {_preview(texts[0])!r}: text {nearest} {_preview(texts[nearest])!r} "
         f"(cosine {sims[nearest]:.3f})")

    t0 = time.monotonic()
    gens = engine.generate(DEMO_PROMPTS, max_new_tokens=32)
    seconds = time.monotonic() - t0
    new_tokens = sum(len(g.token_ids) for g in gens)
    echo(f"generated {new_tokens} tokens for {len(gens)} prompts in one batch in {seconds:.1f}s "
         f"({new_tokens / seconds:.1f} tokens/s, greedy)")
    for prompt, g in zip(DEMO_PROMPTS, gens):
        echo(f"  {prompt!r} -> {_preview(g.text, 90)!r}")
    echo(f"done in {time.monotonic() - started:.1f}s")


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
