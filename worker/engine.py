"""Batched `embed` and `generate` over the model: pre (tokenize, check limits, sort by length)
→ core (forward under `inference_mode`, one token-budget batch at a time) → post (back to CPU,
restore input order). The batcher knows the engine through these few methods only."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from schemas.errors import ErrorCode, TaskError
from worker.checks import check_dims, check_sampling, check_texts
from worker.constrained import CompiledSchema, GrammarRows, MatcherRows, SchemaGrammars
from worker.decode import DRAFT_TOKENS, Decoder, sliding_window
from worker.decoding import GreedyRows, RowSampler, StopOnStrings, cut_at_stop, masks_only, stop_window
from worker.model.loader import LoadedModel, load_from_settings
from worker.settings import Settings

log = logging.getLogger(__name__)


# The fixed cost of one forward pass, in padded tokens' worth of work: what `plan_batches` weighs
# against padding when it decides where one batch ends (measured by `python -m bench --sweep`).
BATCH_OVERHEAD = 128
# One decode step of a `generate` batch, in prompt tokens' worth of work: it reads every weight
# whatever its rows (on the 2-core CPU of docs/PERFORMANCE.md a step of one row cost what prefilling
# 40 prompt tokens did, a step of eight rows 90, when every step scored the whole vocabulary), so a
# batch's fixed cost grows with its new tokens.
DECODE_STEP_TOKENS = 32



@dataclass(frozen=True)
class Tokenized:
    """One input after `pre`: its token ids (already within the limit) and whether it was cut."""

    ids: tuple[int, ...]
    truncated: bool


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dims) float32, in input order
    input_tokens: list[int]
    truncated: list[bool]


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    truncated: bool


def plan_batches(costs: Sequence[int], *, token_budget: int, max_batch_size: int,
                 batch_overhead: int = BATCH_OVERHEAD) -> list[list[int]]:
    """Indices grouped longest-first into batches whose padded cost (longest × count) stays in
    budget, choosing the split that minimises padded tokens plus `batch_overhead` per batch (the
    fixed cost of one forward pass, in tokens). Batches are runs of the length-sorted order, so an
    exact search over where each run ends is cheap (dynamic programming, O(items × batch size)).

    An item over the budget on its own still gets a batch of one."""
    order = sorted(range(len(costs)), key=lambda i: costs[i], reverse=True)
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest plan for the j longest items
    cut = [0] * (n + 1)  # cut[j]: where the last batch of that plan starts
    for j in range(1, n + 1):
        for i in range(j - 1, max(j - max_batch_size, 0) - 1, -1):
            padded = costs[order[i]] * (j - i)  # order[i] is the longest of items i..j-1
            if padded > token_budget and i < j - 1:
                break  # longer batches starting further back only cost more
            total = best[i] + padded + batch_overhead
            if total < best[j]:
                best[j], cut[j] = total, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j]: j])
        j = cut[j]
    return batches[::-1]


class Engine:
    """Gemma behind a narrow interface; one instance per process, used from one thread."""

    def __init__(self, model: LoadedModel, *, max_input_tokens: int, token_budget: int,
                 max_batch_size: int, max_new_tokens: int, head_screen: bool = True,
                 drafts: bool = True) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.device = model.placement.device
        self.max_input_tokens = min(max_input_tokens, model.max_positions)
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.max_new_tokens = max_new_tokens
        # Key/value slots (rows x positions) one merged decode batch may hold: 300 MB of cache for
        # this model in fp32 on CPU (see default_decode_tokens); and those of one `generate` batch.
        self.decode_tokens = default_decode_tokens(self.device)
        self.generate_tokens = default_generate_tokens(self.device)
        self.decoder = (Decoder(model.lm, pad_id=self.tokenizer.pad_token_id, device=self.device, screen=head_screen,
                                table=model.table, draft_tokens=DRAFT_TOKENS if drafts else 0)
                        if model.lm is not None else None)
        self._compiled_forward: Any = None  # set by compile_embedding
        # False: every batch through `generate`, with the full layer's logits (the unoptimised path, for comparison)
        self.batched_decode = True
        eos = model.lm.generation_config.eos_token_id if model.lm is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # Chat-formatted prompts end the model's turn with <end_of_turn>; stop there too.
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            self.eos_ids.add(end_of_turn)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters in the vocabulary's longest token (31 for Gemma 3)."""
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return max(len(t) for t in tokens if t)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def width(self) -> int:
        return self.model.hidden_size

    def warm_up(self) -> float:
        """One tiny embed and generate, so the first real batch does not pay for lazy set-up; the
        generate is not greedy work towards the head's screen (`Decoder.uncounted`)."""
        started = time.monotonic()
        self.embed(["warm up"])
        if self.decoder is not None:
            with self.decoder.uncounted():
                self.generate(["warm up"], max_new_tokens=2)
        return time.monotonic() - started

    # ---- pre -------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], *, truncate: bool, limit: int | None = None,
                 what: str = "input") -> list[Tokenized]:
        """Token ids per text, cut at the limit when `truncate`, else a clear error naming the limit."""
        check_texts(texts, what=what)
        limit = self.max_input_tokens if limit is None else limit
        # A text far over the limit is tokenized only as far as needed: no token is longer than
        # `max_token_chars`, so that many characters per allowed token (plus slack for the
        # boundary) already prove it too long, and a 10 MB message costs milliseconds, not seconds.
        cap = (limit + 64) * self.max_token_chars if any(len(t) > limit for t in texts) else None
        heads = [t[:cap] if cap is not None and len(t) > cap else t for t in texts]
        out = []
        for i, ids in enumerate(self.tokenizer(heads, add_special_tokens=True)["input_ids"]):
            if len(ids) > limit and not truncate:
                count = f"more than {len(ids)}" if len(heads[i]) < len(texts[i]) else str(len(ids))
                raise TaskError(ErrorCode.INPUT_TOO_LONG, (
                    f"{what} {i} has {count} tokens; the limit is max_input_tokens={limit}. "
                    "Shorten it or pass truncate=true to cut it at the limit"))
            out.append(Tokenized(ids=tuple(ids[:limit]), truncated=len(ids) > limit))
        return out

    def check_dims(self, dims: int | None) -> int:
        return check_dims(dims, width=self.width)

    # ---- embed -----------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, dims: int | None = None, normalize: bool = True,
              truncate: bool = False) -> Embeddings:
        dims = self.check_dims(dims)
        return self.embed_tokenized(self.tokenize(texts, truncate=truncate, what="text"), dims=dims, normalize=normalize)

    def embed_tokenized(self, items: Sequence[Tokenized], *, dims: int | None = None,
                        normalize: bool = True) -> Embeddings:
        dims = self.check_dims(dims)
        raw = np.empty((len(items), self.width), dtype=np.float32)
        for batch in plan_batches([len(it.ids) for it in items], token_budget=self.token_budget,
                                  max_batch_size=self.max_batch_size):
            raw[batch] = self.embed_pass([items[i].ids for i in batch])
        return self.finish_embeddings(raw, items, dims=dims, normalize=normalize)

    def finish_embeddings(self, raw: np.ndarray, items: Sequence[Tokenized], *, dims: int,
                          normalize: bool) -> Embeddings:
        """`embed_pass` vectors (rows in the order of `items`) cut to `dims` (Matryoshka truncation)
        and, when `normalize`, scaled to unit length."""
        vectors = raw[:, :dims]
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return Embeddings(vectors=vectors, input_tokens=[len(it.ids) for it in items],
                          truncated=[it.truncated for it in items])

    def _eager_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.model.lm is not None:
            # A causal model: with right padding real tokens never attend to the pads after them,
            # so no padding mask is needed, and without one attention runs its plain causal kernel
            # (about 4% of an embedding pass here). The pads' own outputs are left out by pooling.
            return self.model.body(input_ids=ids).last_hidden_state
        return self.model.body(input_ids=ids, attention_mask=mask).last_hidden_state

    def compile_embedding(self) -> float:
        """Run the embedding forward pass through `torch.compile` (shapes marked dynamic), compiled
        now rather than on a task: fused element-wise work, same arithmetic (fp32 vectors agree to
        float rounding; bf16 ones on a GPU to cosine 0.9997, fusion rounds differently). Worth it
        for long runs only: compiling takes minutes on a small CPU. Both shape regimes (within and
        past the sliding window) are compiled here; a batch of one row or one token is padded to
        two, which the compiled graph covers. Generation is not compiled.
        Returns the seconds spent compiling."""
        started = time.monotonic()
        self._compiled_forward = torch.compile(self._eager_forward, dynamic=True)
        window = sliding_window(getattr(self.model.body, "config", None))
        for width in sorted({16, min(self.max_input_tokens, (window or 256) + 16)}):  # within, past the window
            self.embed_pass([tuple([self.tokenizer.pad_token_id + 1] * width)] * 2)
        return time.monotonic() - started

    def embed_pass(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward pass over token-id rows planned together (`plan_batches`): their mean-pooled
        hidden states, full width, not normalised, in the order given."""
        # Right padding: under causal attention real tokens never see the pads after them,
        # so a text's vector does not depend on what it was batched with.
        count, width = len(rows), max(len(r) for r in rows)
        if self._compiled_forward is not None and (count == 1 or width == 1):
            # A compiled forward is general in rows and width from 2 up; 1 would compile anew.
            rows, width = [rows[0], *rows] if count == 1 else rows, max(width, 2)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = (self._compiled_forward or self._eager_forward)(ids, mask)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return pooled[len(rows) - count:].float().cpu().numpy()

    # ---- generate --------------------------------------------------------------------
    def check_generate_args(self, *, max_new_tokens: int, temperature: float, top_p: float,
                            stop: Sequence[str] | None) -> list[str]:
        if self.model.lm is None:
            raise TaskError(ErrorCode.UNSUPPORTED_KIND, f"model {self.name} is embedding-only and cannot generate")
        return check_sampling(max_new_tokens=max_new_tokens, limit=self.max_new_tokens, temperature=temperature,
                              top_p=top_p, stop=stop)

    @functools.cached_property
    def grammars(self) -> SchemaGrammars:
        """The tokenizer's grammar info and compiled-schema cache, built on the first constrained request."""
        if self.model.lm is None:
            raise TaskError(ErrorCode.UNSUPPORTED_KIND, f"model {self.name} is embedding-only and cannot generate")
        vocab = self.model.lm.get_output_embeddings().weight.shape[0]
        return SchemaGrammars(self.tokenizer, vocab_size=vocab, stop_token_ids=self.eos_ids)

    def check_response_schema(self, schema: Mapping[str, Any] | str, *,
                              stop: Sequence[str] | None = None) -> CompiledSchema:
        """The schema's compiled grammar (cached); a malformed schema raises INVALID_RESPONSE_SCHEMA."""
        if stop:
            raise TaskError(ErrorCode.INVALID_PARAMETER,
                            "stop strings cannot be combined with response_schema: a stop would cut the JSON short")
        return self.grammars.compile(schema)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
                 truncate: bool = False, response_schema: Mapping[str, Any] | str | None = None) -> list[Generation]:
        """Completions in prompt order; with `response_schema` each text is JSON of that schema, or
        finish_reason is "length" when max_new_tokens ran out before the value was complete."""
        stops = self.check_generate_args(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop)
        if response_schema is not None:
            self.check_response_schema(response_schema, stop=stops)
        items = self.tokenize(prompts, truncate=truncate, limit=self.prompt_limit(max_new_tokens), what="prompt")
        return self.generate_tokenized(items, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, stop=stops, seed=seed, response_schema=response_schema)

    def prompt_limit(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed so that prompt plus new tokens fit the model's positions."""
        return min(self.max_input_tokens, self.model.max_positions - max_new_tokens)

    def generate_tokenized(self, items: Sequence[Tokenized], *, max_new_tokens: int, temperature: float = 0.0,
                           top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
                           response_schema: Mapping[str, Any] | str | None = None) -> list[Generation]:
        grammar = None if response_schema is None else self.check_response_schema(response_schema, stop=stop)
        results: list[Generation | None] = [None] * len(items)
        # Each row samples with its own generator: a seed makes a prompt's text independent of
        # its batch mates, and unseeded rows must not share one either.
        seeds = [seed if seed is not None else random.randrange(2**63) for _ in items]
        stop = list(stop)
        may_merge = self.merges(constrained=grammar is not None, temperature=temperature)
        for batch, merged in self.plan_generate(items, max_new_tokens=max_new_tokens, merged=may_merge):
            args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
                        seeds=[seeds[i] for i in batch], grammar=grammar)
            rows = [items[i].ids for i in batch]
            outs = self._decode_merged(rows, **args) if merged else self._generate_batch(rows, **args)
            for i, (ids, reason) in zip(batch, outs):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                text, stopped = cut_at_stop(text, stop) if stop else (text, False)
                results[i] = Generation(text=text, token_ids=ids, prompt_tokens=len(items[i].ids),
                                        finish_reason="stop" if stopped else reason, truncated=items[i].truncated)
        return results  # type: ignore[return-value]

    def merges(self, *, constrained: bool, temperature: float) -> bool:
        """Whether such work goes through the merged decoder: all of it unless `batched_decode` is
        off, but for constrained rows that sample (their grammar masks full logits in `generate`)
        or whose model's generation config reads logits' values (`masks_only`): a constrained greedy
        row there takes the best word its grammar permits (`Decoder.best_allowed`), as in `generate`."""
        if not self.batched_decode or self.decoder is None:
            return False
        return not constrained or (temperature == 0 and self._chooses_permitted())

    def _chooses_permitted(self) -> bool:
        """Whether greedy rows under a grammar can take the best permitted word from the output
        layer's input (`Decoder.best_allowed`) rather than from masked full logits."""
        return (self.decoder is not None and self.decoder.pick_applies
                and masks_only(self.model.lm.generation_config))

    def plan_generate(self, items: Sequence[Tokenized], *, max_new_tokens: int,
                      merged: bool) -> list[tuple[list[int], bool]]:
        """Batches of item indices, each marked True when it goes through the merged decoder.

        `merged` (`merges`): every prompt, however long, in one batch, longest first; the decoder
        prefills them in tight groups and keeps as many rows decoding as the key/value budget holds
        (rows x (longest + new tokens) <= decode_tokens, at most max_batch_size), refilling rows
        as they finish. Else through `generate` in batches under its key/value budget,
        generate_tokens (prompt + new tokens per row): a decode step reads every weight whatever
        the batch, so more rows per step pay."""
        if merged:
            return [(sorted(range(len(items)), key=lambda i: len(items[i].ids), reverse=True), True)] if items else []
        costs = [len(it.ids) + max_new_tokens for it in items]
        # A batch's fixed cost is its decode steps, each reading every weight whatever the rows:
        # padding a prompt costs far less than running its row in a batch of its own.
        overhead = BATCH_OVERHEAD + max_new_tokens * DECODE_STEP_TOKENS
        return [(batch, False) for batch in plan_batches(costs, token_budget=self.generate_tokens,
                                                         max_batch_size=self.max_batch_size, batch_overhead=overhead)]

    def _decode_merged(self, rows: list[tuple[int, ...]], *, max_new_tokens: int, temperature: float, top_p: float,
                       stop: list[str], seeds: list[int],
                       grammar: CompiledSchema | None = None) -> list[tuple[list[int], str]]:
        sampler = RowSampler(temperature=temperature, top_p=top_p, seeds=seeds) if temperature > 0 else None
        rules = None if grammar is None else MatcherRows(dict.fromkeys(range(len(rows)), grammar),
                                                         eos_token_ids=self.eos_ids,
                                                         vocab_size=self.grammars.vocab_size)
        window = stop_window(stop)

        def finished(row: int, ids: list[int]) -> bool:
            if ids[-1] in self.eos_ids:
                return True
            return bool(stop) and any(s in self.tokenizer.decode(ids[-window:], skip_special_tokens=True) for s in stop)

        groups = plan_batches([len(r) for r in rows], token_budget=self.token_budget, max_batch_size=self.max_batch_size)
        with torch.inference_mode():
            outs = self.decoder.run(rows, groups, max_new_tokens=max_new_tokens,
                                    choose=sampler.pick if sampler is not None else None, finished=finished,
                                    slots=self.decode_tokens, max_rows=self.max_batch_size, rules=rules)
        results = []
        for k in range(len(rows)):
            ids = outs[k]
            if ids and ids[-1] in self.eos_ids:
                results.append((ids[:-1], "stop"))
            else:  # a constrained value that closed on the very last token allowed has stopped too
                results.append((ids, "stop" if rules is not None and rules.complete(k) else "length"))
        return results

    def _generate_batch(self, rows: list[tuple[int, ...]], *, max_new_tokens: int, temperature: float,
                        top_p: float, stop: list[str], seeds: list[int],
                        grammar: CompiledSchema | None = None) -> list[tuple[list[int], str]]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        processors = LogitsProcessorList()
        constrained = None
        if grammar is not None:
            # First, so that sampling below draws only among the tokens the grammar allows.
            constrained = GrammarRows([grammar] * len(rows), eos_token_ids=self.eos_ids,
                                      vocab_size=self.grammars.vocab_size)
            processors.append(constrained)
        if temperature > 0:
            processors.append(RowSampler(temperature=temperature, top_p=top_p, seeds=seeds))
        # Greedy rows need only their best permitted word, not 262,144 logits a step: the output
        # layer keeps its input and `GreedyRows`, last, chooses (Decoder.best_allowed).
        # `merges` sends such rows to the merged decoder: a `generate` batch has them only when
        # called for them directly (the bench's baseline, `bench.generation.generate_batches`).
        pick = temperature == 0 and self.batched_decode and self._chooses_permitted()
        if pick:
            processors.append(GreedyRows(self.decoder))
        criteria = StoppingCriteriaList()
        if stop:
            criteria.append(StopOnStrings(stops=stop, tokenizer=self.tokenizer, prompt_width=width))
        with torch.inference_mode(), self.decoder.stashing() if pick else contextlib.nullcontext():
            out = self.model.lm.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
                do_sample=False, top_k=None, top_p=None, temperature=None, pad_token_id=pad,
                eos_token_id=sorted(self.eos_ids), logits_processor=processors, stopping_criteria=criteria,
            )
        results = []
        for i, row in enumerate(out[:, width:].cpu().tolist()):
            # Rows that finished early are filled with pads after their end.
            cut = next((j for j, t in enumerate(row) if t in self.eos_ids or t == pad), None)
            if cut is not None:
                results.append((row[:cut], "stop"))
            elif constrained is not None and constrained.complete(i, last_token=row[-1]):
                results.append((row, "stop"))  # the value closed on the very last token allowed
            else:
                results.append((row, "length"))
        return results


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per forward batch. On CPU, about 1,000 tokens keep a layer's activations in
    cache (1,024-token batches ran about 15% faster per token than 2,048 in a development timing;
    `python -m bench --sections embedding --sweep` could not separate 512 to 2,048 from the noise,
    docs/PERFORMANCE.md); a GPU needs large batches to fill its cores."""
    return 32768 if device.type == "cuda" else 1024


def default_decode_tokens(device: torch.device) -> int:
    """Key/value slots (rows x positions) of one merged decode batch: 8,192 on CPU (300 MB of cache
    for Gemma 3 270M in fp32: 17 rows of a 400-token prompt and 64 new tokens), 262,144 on a GPU.

    On CPU the merged decoder refills rows as they end, so fewer slots cost little; half the cache
    took the peak RSS of generating the bench's 64 prompts from 2.43-2.45 GB to 2.16 GB in the same
    time (docs/PERFORMANCE.md, "Memory, a smaller key/value budget")."""
    return 262144 if device.type == "cuda" else 8192


def default_generate_tokens(device: torch.device) -> int:
    """Key/value slots (rows x (prompt + new tokens)) of one `generate` batch (constrained rows that
    sample, or all work with batched decoding off): 16,384 on CPU, 262,144 on a GPU. A `generate` batch runs to
    its longest row without refilling, so its rows per step matter more than the merged decoder's
    (graph prompts under the task's schema ran 1.24x faster at 16,384 than at 8,192; the same
    section of docs/PERFORMANCE.md)."""
    return 262144 if device.type == "cuda" else 16384


def build_engine(settings: Settings) -> Engine:
    """Prepare, load and wrap the model the settings name; called once at startup."""
    model = load_from_settings(settings)
    budget = settings.token_budget or default_token_budget(model.placement.device)
    engine = Engine(model, max_input_tokens=settings.max_input_tokens,
                    token_budget=budget, max_batch_size=settings.max_batch_size,
                    max_new_tokens=settings.max_new_tokens, head_screen=settings.head_screen,
                    drafts=settings.drafts)
    if settings.compile:
        log.info("embedding forward pass compiled in %.1fs", engine.compile_embedding())
    return engine
