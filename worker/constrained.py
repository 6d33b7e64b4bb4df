"""JSON-Schema-constrained decoding with xgrammar: the decoded text of a constrained row is JSON
of the schema by construction. One `SchemaGrammars` per engine holds the tokenizer info (built
once) and the compiled grammars (once per schema, keyed by canonical JSON); `GrammarRows` is
the logits processor that gives each row of a batched `generate` its own matcher (sampled rows),
`MatcherRows` the same for greedy rows of the merged decoder, drafts included (worker/decode.py)."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from schemas.errors import ErrorCode, TaskError
from worker.decoding import Permitted

MAX_SCHEMA_CHARS = 100_000


def canonical_schema(schema: Mapping[str, Any] | str) -> str:
    """One text per schema (no spaces), so equal schemas share a grammar and a batch. Keys keep
    their order: the grammar writes an object's properties in the order the schema lists them."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise TaskError(ErrorCode.INVALID_RESPONSE_SCHEMA, f"response_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping):
        raise TaskError(ErrorCode.INVALID_RESPONSE_SCHEMA,
                        f"response_schema must be a JSON Schema object, got {type(schema).__name__}")
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise TaskError(ErrorCode.INVALID_RESPONSE_SCHEMA,
                        f"response_schema has {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}")
    return text


@dataclass(frozen=True)
class CompiledSchema:
    """A schema's grammar and validator; `key` is its canonical JSON."""

    key: str
    grammar: xgr.CompiledGrammar = field(compare=False, repr=False)
    validator: Any = field(compare=False, repr=False)

    def parse(self, text: str) -> Any:
        """The decoded value, checked against the schema (a safety net for keywords the grammar cannot enforce)."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise TaskError(ErrorCode.INTERNAL, f"constrained output is not JSON ({exc}); please report this") from None
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise TaskError(ErrorCode.INVALID_RESPONSE_SCHEMA, (
                f"the output does not satisfy the schema at {path}: {error.message}; the grammar engine cannot "
                f"enforce the keyword {error.validator!r}, so drop it from response_schema"))
        return value


class SchemaGrammars:
    """Compiles JSON Schemas into grammars over one tokenizer; thread-safe, cached by canonical JSON."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: Iterable[int],
                 max_cached: int = 64, max_threads: int = 2) -> None:
        self.stop_token_ids = sorted(stop_token_ids)
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[str, Future[CompiledSchema]] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()

    def compile(self, schema: Mapping[str, Any] | str) -> CompiledSchema:
        """The schema's grammar, compiled on first use; a bad schema raises INVALID_RESPONSE_SCHEMA."""
        key = canonical_schema(schema)
        with self._lock:
            pending = self._cache.get(key)
            owner = pending is None
            if owner:
                pending = self._cache[key] = Future()
                while len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        if owner:
            # One compile per schema: tasks that arrive meanwhile wait for it rather than each
            # compiling the same grammar on the cores the engine needs.
            try:
                pending.set_result(self._compile(key))
            except Exception as exc:  # noqa: BLE001 - waiters get the same error, then it is forgotten
                with self._lock:
                    self._cache.pop(key, None)
                pending.set_exception(exc)
        return pending.result()

    def _compile(self, key: str) -> CompiledSchema:
        schema = json.loads(key)
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise TaskError(ErrorCode.INVALID_RESPONSE_SCHEMA,
                            f"response_schema is not a valid JSON Schema at {path}: {exc.message}") from None
        try:
            # Compact JSON: flexible whitespace would let a small model loop on spaces and newlines.
            grammar = self._compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        except RuntimeError as exc:
            reason = str(exc).rsplit(": ", 1)[-1].strip() if ": " in str(exc) else str(exc).strip()
            raise TaskError(ErrorCode.INVALID_RESPONSE_SCHEMA,
                            f"response_schema cannot be turned into a grammar: {reason}") from None
        return CompiledSchema(key=key, grammar=grammar, validator=cls(schema))


class GrammarRows(LogitsProcessor):
    """One matcher per row of a batched `generate`: masks every token its grammar forbids, and once
    a row's JSON is complete allows only end-of-sequence, so finished rows stop rather than ramble.

    Rows whose grammar is None are left as they are."""

    def __init__(self, grammars: list[CompiledSchema | None], *, eos_token_ids: Iterable[int], vocab_size: int) -> None:
        self.matchers = [xgr.GrammarMatcher(g.grammar) if g is not None else None for g in grammars]
        self.eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.constrained = [i for i, m in enumerate(self.matchers) if m is not None]
        self.failed = [False] * len(grammars)
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        self._bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self._first = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if not self._first:
            self._accept(input_ids[:, -1].tolist())
        self._first = False
        live = [i for i in self.constrained if not self._finished(i)]
        if live:
            self._batch.batch_fill_next_token_bitmask([self.matchers[i] for i in live], self._bitmask, indices=live)
            xgr.apply_token_bitmask_inplace(scores, self._bitmask.to(scores.device), vocab_size=self.vocab_size,
                                            indices=live)
        ended = [i for i in self.constrained if self._finished(i)]
        if ended:
            only_eos = torch.full_like(scores[0], float("-inf"))
            only_eos[self.eos] = 0.0
            scores[ended] = only_eos
        return scores

    def complete(self, row: int, *, last_token: int) -> bool:
        """Whether a row that used up its tokens still ended on a whole value: `last_token` is the
        one sampled after the processor's last call (unconstrained rows always count as whole)."""
        matcher = self.matchers[row]
        if matcher is None:
            return True
        if not self._finished(row) and not matcher.accept_token(last_token):
            self.failed[row] = True
        return not self.failed[row] and (matcher.is_terminated() or matcher.is_completed())

    def _finished(self, row: int) -> bool:
        return self.failed[row] or self.matchers[row].is_terminated()

    def _accept(self, last_tokens: list[int]) -> None:
        for i in self.constrained:
            if self._finished(i):
                continue  # the row already ended; what follows is padding
            if not self.matchers[i].accept_token(last_tokens[i]):
                self.failed[i] = True  # cannot happen under the mask; end the row rather than emit garbage


class MatcherRows:
    """Grammar matchers for the constrained rows of the merged decoder (worker/decode.py `Rules`),
    keyed by the row's index in the decoder's call. A row's masks are what `GrammarRows` gives the
    same row in a `generate` batch: the words its grammar permits next, only end-of-sequence once
    its value is complete (or, should a token ever be refused, once it failed)."""

    def __init__(self, grammars: Mapping[int, CompiledSchema], *, eos_token_ids: Iterable[int], vocab_size: int) -> None:
        self.matchers = {row: xgr.GrammarMatcher(g.grammar) for row, g in grammars.items()}
        self.eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.failed: set[int] = set()
        only_eos = torch.zeros((1, vocab_size), dtype=torch.bool)
        only_eos[0, self.eos] = True
        self._only_eos = Permitted.of(only_eos).bits[0]  # an ended row's mask

    def allowed(self, rows: list[tuple[int, list[int]]]) -> Permitted:
        """For each (row, drafts), the words permitted after the row's accepted tokens, then after
        each of its drafts in turn (1 + len(drafts) positions a row; a row's positions after a
        draft its grammar refuses permit nothing, as the model cannot choose that draft there).
        The matchers end as they began."""
        count = sum(1 + len(drafts) for _, drafts in rows)
        bitmask = xgr.allocate_token_bitmask(count, self.vocab_size)
        bitmask.zero_()
        at = 0
        for row, drafts in rows:
            if self._ended(row):
                bitmask[at: at + 1 + len(drafts)] = self._only_eos
            else:
                self._walk(row, drafts, bitmask=bitmask, at=at)
            at += 1 + len(drafts)
        return Permitted(bitmask, self.vocab_size)

    def permitted(self, row: int, drafts: list[int]) -> list[int]:
        """The longest head of `drafts` the row's grammar would take from where it is (the model
        cannot choose a refused draft, so scoring one and what follows it is wasted)."""
        return [] if self._ended(row) else drafts[: self._walk(row, drafts)]

    def accept(self, row: int, token: int) -> None:
        """The row's next token (one its mask permitted)."""
        if row in self.matchers and not self._ended(row) and not self.matchers[row].accept_token(token):
            self.failed.add(row)  # cannot happen under the mask; the row is then offered only end-of-sequence

    def complete(self, row: int) -> bool:
        """Whether the row's value is whole (its JSON closed), for a row that used up its tokens."""
        matcher = self.matchers.get(row)
        return matcher is None or (row not in self.failed and (matcher.is_terminated() or matcher.is_completed()))

    def _ended(self, row: int) -> bool:
        return row in self.failed or self.matchers[row].is_terminated()

    def _walk(self, row: int, drafts: list[int], *, bitmask: torch.Tensor | None = None, at: int = 0) -> int:
        """How many of `drafts` the row's grammar takes in turn from where it is; with `bitmask`,
        its rows `at`, `at` + 1, ... get the mask before each draft taken and after the last. The
        matcher is rolled back to where it was."""
        matcher = self.matchers[row]
        taken = 0
        for j in range(len(drafts) + 1):
            if bitmask is not None:
                matcher.fill_next_token_bitmask(bitmask, at + j)
            if j == len(drafts) or matcher.is_terminated() or not matcher.accept_token(drafts[j]):
                break
            taken += 1
        if taken:
            matcher.rollback(taken)
        return taken
