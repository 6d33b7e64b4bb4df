"""Where a fresh process spends its start and its first calls: cProfile of building the engine,
then of the first and second embedding of the bench's texts and generation for its prompts.

    python -m bench.coldprofile MODEL_DIR --device cuda --out DIR

Writes DIR/build.txt, embed0.txt, embed1.txt, gen0.txt, gen1.txt (cumulative and own-time top
lists) and prints each part's seconds. The second call shows what the first paid once: a function
whose own time drops between them did per-size or per-process set-up."""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def profiled(out: Path, name: str, fn: Callable[[], T], *, cuda: bool) -> T:
    profile = cProfile.Profile()
    started = time.monotonic()
    profile.enable()
    value = fn()
    if cuda:
        torch.cuda.synchronize()
    profile.disable()
    seconds = time.monotonic() - started
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
    (out / f"{name}.txt").write_text(f"{name}: {seconds:.2f} s\n{text.getvalue()}")
    print(f"{name}: {seconds:.2f} s", flush=True)
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.coldprofile", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory (or any source the worker takes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from bench import generation
    from bench.common import embed_texts
    from worker.engine import build_engine
    from worker.settings import Settings

    args.out.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"model": args.model, "device": args.device}
    if args.cache_dir is not None:
        options["cache_dir"] = args.cache_dir
    cuda = torch.cuda.is_available() and args.device != "cpu"
    engine = profiled(args.out, "build", lambda: build_engine(Settings(**options)), cuda=cuda)
    print(f"warm-up: {engine.warm_up():.2f} s", flush=True)
    texts, items = embed_texts(args.texts), generation.prompts(engine, args.prompts)
    for i in range(2):
        profiled(args.out, f"embed{i}", lambda: engine.embed(texts, truncate=True), cuda=cuda)
    for i in range(2):
        profiled(args.out, f"gen{i}", lambda: engine.generate_tokenized(items, max_new_tokens=args.max_new_tokens), cuda=cuda)
    return {"out": str(args.out)}


if __name__ == "__main__":
    main()
