"""Figures the reliability suite measures, appended to out/reliability/figures.jsonl and printed,
so docs/RELIABILITY.md quotes the suite's own output."""
from __future__ import annotations

import json
import time
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[2] / "out" / "reliability" / "figures.jsonl"


def record(test: str, **figures: object) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    entry = {"test": test, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    with FIGURES.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    print("reliability figures:", json.dumps(entry))
