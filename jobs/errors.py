"""The one error type of the bulk job: a code, a message a person can act on, and whether a retry helps."""
from __future__ import annotations


class JobError(Exception):
    """A run cannot go on. `retryable` says whether running the same task again can help."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
