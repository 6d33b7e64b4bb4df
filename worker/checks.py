"""The checks on a request that need no model: the engine runs them on every call, and the CLI
before it loads the model, so a bad argument is refused in a fraction of a second, not after the
load."""
from __future__ import annotations

import math
from collections.abc import Sequence

from schemas.errors import ErrorCode, TaskError

# Below this the sampler's logits / temperature overflow to inf (measured: 1e-45 fails, 1e-30 does
# not); such a temperature is greedy in all but name, so it is refused rather than half-supported.
MIN_TEMPERATURE = 1e-6


def check_texts(texts: Sequence[str], *, what: str = "input") -> None:
    """A non-empty list of strings, none of them blank."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TaskError(ErrorCode.INVALID_FIELD, f"{what}s must be a list of strings")
    if not texts:
        raise TaskError(ErrorCode.EMPTY_INPUT, f"no {what}s given: pass at least one")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TaskError(ErrorCode.INVALID_FIELD, f"{what} {i} is {type(text).__name__}, not a string")
        if not text.strip():
            raise TaskError(ErrorCode.EMPTY_INPUT, f"{what} {i} is empty")


def check_dims(dims: int | None, *, width: int) -> int:
    """Matryoshka dimensions to keep: 1 to the model's width (`width` where None)."""
    if dims is None:
        return width
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= width:
        raise TaskError(ErrorCode.INVALID_PARAMETER, f"dims must be an integer from 1 to {width} (the model's width), got {dims!r}")
    return dims


def check_sampling(*, max_new_tokens: int, limit: int, temperature: float, top_p: float,
                   stop: Sequence[str] | None) -> list[str]:
    """Generation parameters against `limit` (the engine's max_new_tokens); returns the stop strings."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= limit:
        raise TaskError(ErrorCode.MAX_TOKENS_OUT_OF_RANGE,
                        f"max_new_tokens must be from 1 to max_new_tokens={limit}, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise TaskError(ErrorCode.INVALID_PARAMETER, f"temperature must be a finite number >= 0, got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise TaskError(ErrorCode.INVALID_PARAMETER,
                        f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise TaskError(ErrorCode.INVALID_PARAMETER, f"top_p must be in (0, 1], got {top_p!r}")
    stops = list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise TaskError(ErrorCode.INVALID_PARAMETER, "stop strings must be non-empty strings")
    return stops
