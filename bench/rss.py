"""One fresh process that builds the engine (optionally `--quantize`d), warms it as the service
does, then embeds the bench's texts or generates for its prompts (`--calls` times): what a worker
doing only that work would peak at, how long it took to be ready, and what the first real call
still paid against later ones.

    python -m bench.rss --quantize int4 --work generate --prompts 64
    python -m bench.rss --work generate --temperature 0.8   # sampling: full logits every step
    python -m bench.rss --work generate --decode-tokens 16384   # another key/value budget
    python -m bench.rss --model DIR --device cuda --work embed --calls 3   # a GPU cold start

Prints one JSON object: build seconds, spawn-to-ready seconds (interpreter start, imports, load,
warm-up; from `--spawned-at`, the parent's clock before it started this process) and the part of
it spent before loading (interpreter and imports), the seconds of each call of the work, and peak RSS after building and after the work (on CUDA also the peak device memory allocated)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import embed_texts, peak_rss
from worker.settings import QUANTIZE_MODES


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.rss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None)
    parser.add_argument("--work", choices=["embed", "generate"], default="generate")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="generate: sample at this temperature (seeded) instead of greedy (default 0)")
    parser.add_argument("--model", default=None, help="model source (default: the embedded Gemma)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--calls", type=int, default=1, help="how many times to run the work (default 1)")
    parser.add_argument("--no-head-screen", dest="head_screen", action="store_false",
                        help="score every word of the output layer in fp32 (worker/model/head_screen.py)")
    parser.add_argument("--no-onednn", dest="onednn", action="store_false",
                        help="keep PyTorch's linear for the body's layers (worker/model/onednn.py)")
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="generate: key/value slots of a merged decode batch (default: the engine's, "
                             "worker.engine.default_decode_tokens)")
    parser.add_argument("--spawned-at", type=float, default=None,
                        help="the parent's time.time() just before starting this process")
    args = parser.parse_args(argv)
    import torch

    from bench import generation
    from worker.engine import build_engine
    from worker.settings import Settings

    imports_s = time.time() - args.spawned_at if args.spawned_at is not None else None
    started = time.monotonic()
    options: dict[str, Any] = {"device": args.device, "quantize": args.quantize, "head_screen": args.head_screen,
                               "onednn": args.onednn}
    if args.model is not None:
        options["model"] = args.model
    if args.cache_dir is not None:
        options["cache_dir"] = args.cache_dir
    engine = build_engine(Settings(**options))
    built = time.monotonic() - started
    if args.decode_tokens is not None:
        engine.decode_tokens = args.decode_tokens
    warm_up_s = engine.warm_up()
    ready_s = time.time() - args.spawned_at if args.spawned_at is not None else None
    after_build = peak_rss()
    if args.work == "embed":
        texts = embed_texts(args.texts)
        work = lambda: engine.embed(texts, truncate=True)  # noqa: E731
    else:
        items = generation.prompts(engine, args.prompts)
        work = lambda: engine.generate_tokenized(items, max_new_tokens=64, temperature=args.temperature,  # noqa: E731
                                                 seed=0 if args.temperature else None)
    calls = []
    for _ in range(args.calls):
        began = time.monotonic()
        work()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        calls.append(time.monotonic() - began)
    result = {"quantize": args.quantize, "work": args.work, "temperature": args.temperature,
              "device": engine.device.type, "head_screen": args.head_screen, "decode_tokens": engine.decode_tokens,
              "onednn": engine.model.linear.used if engine.model.linear is not None else False,
              "imports_s": imports_s, "build_s": built, "load_s": engine.model.load_seconds, "warm_up_s": warm_up_s,
              "spawn_to_ready_s": ready_s, "calls_s": calls,
              "peak_rss_after_build_bytes": after_build, "peak_rss_bytes": peak_rss()}
    if engine.device.type == "cuda":
        result["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    decoder = engine.decoder
    if decoder is not None and decoder.screen_trial is not None:  # the head screen's timing, kept or dropped
        result["head_screen_trial"] = asdict(decoder.screen_trial)
    print(json.dumps(result))
    return result


def measure(quantize: str | None, *, work: str = "generate", prompts: int = 64, texts: int = 500,
            model: str | None = None, cache_dir: Path | None = None, device: str = "cpu",
            calls: int = 1, decode_tokens: int | None = None) -> dict[str, Any]:
    """Run `main` in a fresh interpreter (peak RSS and start-up are per process) and return its figures."""
    cmd = [sys.executable, "-m", "bench.rss", "--work", work, "--prompts", str(prompts), "--texts", str(texts),
           "--device", device, "--calls", str(calls)]
    if quantize is not None:
        cmd += ["--quantize", quantize]
    if model is not None:
        cmd += ["--model", model]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    if decode_tokens is not None:
        cmd += ["--decode-tokens", str(decode_tokens)]
    out = subprocess.run(cmd + ["--spawned-at", repr(time.time())], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
