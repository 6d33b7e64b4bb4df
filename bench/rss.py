"""Peak RSS of one fresh process that builds the engine (optionally `--quantize`d) and then embeds
the bench's texts or generates for its prompts: what a worker doing only that work would peak at.

    python -m bench.rss --quantize int4 --work generate --prompts 64

Prints one JSON object: peak RSS after building, after the work, and the build seconds."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import embed_texts, peak_rss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.rss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--work", choices=["embed", "generate"], default="generate")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--texts", type=int, default=500)
    args = parser.parse_args(argv)
    from bench import generation
    from worker.engine import build_engine
    from worker.settings import Settings

    started = time.monotonic()
    engine = build_engine(Settings(device="cpu", quantize=args.quantize))
    built = time.monotonic() - started
    after_build = peak_rss()
    if args.work == "embed":
        engine.embed(embed_texts(args.texts), truncate=True)
    else:
        engine.generate_tokenized(generation.prompts(engine, args.prompts), max_new_tokens=64)
    result = {"quantize": args.quantize, "work": args.work, "build_s": built,
              "peak_rss_after_build_bytes": after_build, "peak_rss_bytes": peak_rss()}
    print(json.dumps(result))
    return result


def measure(quantize: str | None, *, work: str = "generate", prompts: int = 64, texts: int = 500) -> dict[str, Any]:
    """Run `main` in a fresh interpreter (peak RSS is per process) and return its figures."""
    cmd = [sys.executable, "-m", "bench.rss", "--work", work, "--prompts", str(prompts), "--texts", str(texts)]
    if quantize is not None:
        cmd += ["--quantize", quantize]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
