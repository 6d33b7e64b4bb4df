"""One frozen settings object, built once from flags and environment (click `envvar=`) and passed down."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_MODEL = "embedded"
# The lossy modes `quantize` takes, by name (worker/model/loader.quantize); bf16 is CPU only.
QUANTIZE_MODES = ("int8", "int4", "bf16")


def default_cache_dir() -> Path:
    """Where converted and downloaded models live: $GEMMA_BATCH_CACHE, else the user's cache dir."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gemma-batch"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a process needs to know, fixed at startup."""

    model: str = EMBEDDED_MODEL
    cache_dir: Path = default_cache_dir()
    device: str = "auto"
    max_input_tokens: int = 2048
    token_budget: int | None = None  # None: chosen by device, see engine.default_token_budget
    max_batch_size: int = 64
    max_new_tokens: int = 1024
    max_texts_per_task: int = 256
    max_message_bytes: int = 10_000_000
    max_wait_ms: int = 20
    max_attempts: int = 5
    io_workers: int = 16
    flow_max_messages: int = 256
    flow_max_bytes: int = 100_000_000
    max_lease_s: int = 900
    lease_extension_s: int = 10
    drain_s: float = 6.0
    quantize: str | None = None  # "int8", "int4" or "bf16" (CPU): lossy; see worker/model/loader.quantize
    result_cache: bool = True  # answer identical greedy or seeded tasks from the results store's _cache/
    compile: bool = False  # torch.compile the embedding forward pass; see engine.Engine.compile_embedding
    head_screen: bool = True  # greedy head through a bf16, int8 or int4 screen on CPU; see worker/model/head_screen.py
    drafts: bool = True  # greedy rows verify prompt-lookup drafts, several tokens a step; see worker/decode.py
    onednn: bool = True  # the body's fp32 linear layers through oneDNN where a probe finds it faster; worker/model/onednn.py

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be int8, int4, bf16 or unset, got {self.quantize!r}")
        if self.compile and self.quantize is not None:
            raise ValueError("compile and quantize cannot be combined: choose one")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("max_input_tokens", "token_budget", "max_batch_size", "max_new_tokens", "max_texts_per_task",
                     "max_message_bytes", "max_attempts", "io_workers", "flow_max_messages", "flow_max_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
