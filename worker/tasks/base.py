"""What every task handler receives and returns."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from worker.batcher import TokenBudgetBatcher
from worker.engine import Engine
from worker.settings import Settings


@dataclass(frozen=True)
class TaskContext:
    """Built once at startup and handed to every task."""

    settings: Settings
    engine: Engine
    batcher: TokenBudgetBatcher


@dataclass(frozen=True)
class Started:
    """A task on its way: the batcher's future, and how to turn its value into the kind's output.

    `finish` runs on an I/O thread, not the engine thread, so the engine stays busy."""

    future: Future
    finish: Callable[[Any], BaseModel]
