"""Shared pieces of the peer benchmark (`python -m bench`): the real inputs every contender gets,
a timer, the machine's description, and the table printer.

Every figure a section reports is measured in the same process, one contender after the other on
the same inputs, so a claim is a ratio of two numbers taken minutes apart on the same machine."""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from worker.corpus import stdlib_docstrings

if TYPE_CHECKING:
    from worker.engine import Engine

T = TypeVar("T")

GENERATE_INSTRUCTION = "Explain in detail what the following Python documentation describes:\n\n"


@dataclass(frozen=True)
class Timed:
    value: Any
    seconds: float


def timed(fn: Callable[[], T]) -> Timed:
    started = time.perf_counter()
    value = fn()
    return Timed(value, time.perf_counter() - started)


def alternating(contenders: dict[str, Callable[[], T]], repeats: int) -> tuple[dict[str, list[float]], dict[str, T]]:
    """Each of two contenders timed `repeats` times, alternating A, B, B, A, A, B, ... so a drift of
    the shared machine falls on both alike: (seconds of each run, each one's last value)."""
    (a, fa), (b, fb) = contenders.items()
    times: dict[str, list[float]] = {a: [], b: []}
    values: dict[str, T] = {}
    for k in range(repeats):
        for name, fn in (((a, fa), (b, fb)) if k % 2 == 0 else ((b, fb), (a, fa))):
            run = timed(fn)
            times[name].append(run.seconds)
            values[name] = run.value
    return times, values


def chosen_sections(text: str, known: Sequence[str]) -> list[str]:
    """The comma-separated section names in `text`, in order; ValueError naming any unknown one."""
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(known))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return sections


def chat_prompt(text: str) -> str:
    """A Gemma chat turn asking for an explanation, so answers run long (no `<bos>`: tokenizers add it)."""
    return f"<start_of_turn>user\n{GENERATE_INSTRUCTION}{text}<end_of_turn>\n<start_of_turn>model\n"


def mixed_length(lengths: Sequence[int], n: int, *, longest: int) -> list[int]:
    """Indices of n texts whose token lengths step evenly from the shortest to `longest` (short to
    long in equal measure, not as the corpus happens to be distributed), in corpus order, so the
    choice is stable across runs."""
    usable = sorted((i for i, k in enumerate(lengths) if k <= longest), key=lambda i: lengths[i])
    if len(usable) < n:
        raise ValueError(f"only {len(usable)} texts of at most {longest} tokens; {n} were asked for")
    low, high = lengths[usable[0]], lengths[usable[-1]]
    picked: list[int] = []
    start = 0
    for j in range(n):
        target = low + (high - low) * j / max(n - 1, 1)
        # the first unused text at or past the target length (the list is sorted by length)
        while start < len(usable) - (n - j) and lengths[usable[start]] < target:
            start += 1
        picked.append(usable[start])
        start += 1
    return sorted(picked)


def embed_texts(n: int, *, max_chars: int = 2000) -> list[str]:
    """n real texts of mixed length: standard-library docstrings, the first n found, whitespace kept."""
    texts = stdlib_docstrings(n, min_chars=20, max_chars=max_chars)
    if len(texts) < n:
        raise ValueError(f"the standard library has only {len(texts)} docstrings; {n} were asked for")
    return texts


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_start": os.getloadavg()}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss(pid: int | str = "self") -> int:
    """A live process's peak resident set in bytes (Linux VmHWM). Unlike `ru_maxrss`, which Linux
    carries over an exec from the forking parent, it counts this program's own memory only."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def flops_per_token(engine: Engine) -> float:
    """2 x non-embedding parameters: the matmul work per token of a forward pass (attention's
    sequence-length term is small at these lengths and left out)."""
    body = engine.model.body
    embedding = body.get_input_embeddings().weight.numel()
    return 2.0 * (sum(p.numel() for p in body.parameters()) - embedding)


def attention_flops(engine: Engine, lengths: list[int]) -> float:
    """The attention scores and weighted sums over the given texts (causal, each sliding layer
    seeing at most its window): 2 x 2 x query width FLOPs per (token, visible position) per layer,
    the context term of the usual count (Kaplan et al. 2020, C = 2N + 2 n_layer n_ctx d_attn)
    that `flops_per_token` leaves out."""
    config = getattr(engine.model.body, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(config.num_hidden_layers)
    width = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) \
        * int(config.num_attention_heads)
    kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(config, "sliding_window", None)
    total = 0.0
    for n in lengths:
        full = n * (n + 1) / 2  # sum over positions p = 1..n of p visible positions
        if window and n > window:
            sliding = window * (window + 1) / 2 + (n - window) * window
        else:
            sliding = full
        total += sum(sliding if kind == "sliding_attention" else full for kind in kinds)
    return 4.0 * width * total
