"""Batched decoding that keeps the expensive step full: prompts are prefilled in tight, length-sorted
groups (little padding), their key/value caches are merged into one preallocated cache, and a single
decode loop then advances every row at once, dropping finished rows as it goes and prefilling
waiting prompts into their places (continuous batching).

Why: on this model one decode step costs nearly the same for 8 rows as for 64 (the 262k-word output
layer and the weights are read once per step either way), while a prefill costs per padded token.
`model.generate` on one left-padded batch pays for both the padding of the longest prompt and for
rows that already ended. Here prefill pays only for tight groups, and decode only for live rows.

The merged cache holds each row right-aligned (left padding, masked), exactly as `generate` holds a
left-padded batch, so a row's tokens do not depend on its batch mates beyond float rounding. Rows
of any length are held: the sliding-window layers keep every column, but each step shows them only
the columns inside each position's window (the mask `generate` builds for them), and only from the
oldest column any position of the step can see (`_SlidingSlotLayer.start`), so a step's sliding
attention reads about a window's keys per row however long the row. See bench/generation.py for
the measurements."""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from worker.decoding import Permitted
from worker.model import head_screen
from worker.model.table import Int8Table, rows_of, scores

log = logging.getLogger(__name__)

# Vocabulary rows per output-layer block when only the best token is needed, on CPU: a block's
# logits stay in cache and the (rows x 262k) logits matrix is never written out (bench/generation.py
# measures it). On a GPU the whole vocabulary is one block: 64 blocks would be 64 x 4 small kernel
# launches per decode step where launches, not memory traffic, set the pace (`bench.gpu` times both).
VOCAB_BLOCK = 4096

# Build the greedy head's screen once the full output layer has taken this long in greedy
# rows, about what building the int4 screen takes on 2 cores: a short call (one CLI prompt of a few
# tokens) never pays for a screen it would not earn back, and a long one pays at most twice.
SCREEN_AFTER_S = 1.5
# Then time it against the full layer, this many rounds each, at each of these rows per call (one
# prompt's step up to a batch's), and keep it for calls up to the largest size at which it was faster
# (for every call if that is the largest size; a larger call is screened in pieces of that size
# where the trial's times say the pieces beat the full layer): the int4 screen's cost grows with the
# rows faster than the full layer's, so on some CPUs it wins for a lone prompt and loses for a batch.
TRIAL_ROUNDS = 2
TRIAL_SIZES = (1, 8, 32)

# A greedy row of a `generate` batch whose processors (a grammar) permit at most this many words is
# scored on those words alone (`Decoder.best_allowed`): at JSON punctuation, or a key the schema
# fixes, a handful of dot products instead of the whole 262,144-word layer.
ALLOWED_DIRECT = 4096

# Shrink the decode batch (copying the cache) only once this share of its rows has finished:
# copying on every finished row would cost more than the steps it saves.
COMPACT_BELOW = 0.75

# Greedy rows draft up to this many tokens per step by prompt lookup (`Lookup`): the words that
# followed the latest earlier occurrence of the row's last `DRAFT_NGRAM` tokens (or fewer) in its
# prompt and output. One forward pass then scores the row's token and its drafts together, and the
# row keeps every draft the model would have chosen itself, plus the model's own next token: the
# same greedy tokens in fewer steps. On 2 CPU cores a step of 31 rows x 4 positions cost about 1.6
# times one of 31 x 1, and answers that restate their prompt accept most drafts (docs/PERFORMANCE.md).
# When fewer rows are live (the batch's last, slowest rows), each may draft more, up to
# `DRAFT_POSITIONS` positions a step in all and `DRAFT_MAX` per row: a step's cost is mostly its
# weights' reads, and the rows that hold the batch open are the ones worth speeding.
DRAFT_TOKENS = 3
DRAFT_POSITIONS = 128
DRAFT_MAX = 15
DRAFT_NGRAM = 3


class Rules(Protocol):
    """Per-row constraints on greedy rows (worker/constrained.py `MatcherRows`): which words each
    row may take next, and the tokens it took. Rows are indices into the decoder's `rows`."""

    def allowed(self, rows: list[tuple[int, list[int]]]) -> Permitted:
        """Per (row, drafts), the words its next position permits, then after each draft's."""

    def permitted(self, row: int, drafts: list[int]) -> list[int]:
        """The longest head of `drafts` the row's rules would take from where it is."""

    def accept(self, row: int, token: int) -> None: ...


class _SlotLayer(DynamicLayer):
    """One layer's keys and values in a buffer sized for the whole decode, written in place (no
    concatenation per step, which would copy the whole cache every token). The buffer holds as many
    rows as the batch may ever have (`Decoder._session`); its first `rows` are the live batch, so
    rows leaving and joining rewrite it in place (`Decoder._rebuild`) rather than allocating anew."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, *, rows: int | None = None) -> None:
        super().__init__()
        self.keys_buf, self.values_buf, self.length = keys, values, length
        self.rows = keys.shape[0] if rows is None else rows
        self.device = keys.device
        self.is_initialized = True
        # Where each row's next keys go (rows,), set by the decoder before every step: rows advance
        # by different numbers of tokens when drafts are verified.
        self.write_at = torch.full((self.rows,), length, dtype=torch.long, device=keys.device)
        self._expose()

    def _expose(self) -> None:
        self.keys = self.keys_buf[: self.rows, :, : self.length]
        self.values = self.values_buf[: self.rows, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
               ) -> tuple[torch.Tensor, torch.Tensor]:
        q = key_states.shape[-2]
        rows = torch.arange(key_states.shape[0], device=key_states.device)[:, None]
        columns = self.write_at[:, None] + torch.arange(q, device=key_states.device)
        self.keys_buf[rows, :, columns] = key_states.transpose(1, 2)
        self.values_buf[rows, :, columns] = value_states.transpose(1, 2)
        self.length = int(self.write_at.max()) + q
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


class _SlidingSlotLayer(_SlotLayer):
    """A sliding-window layer's slots: every column is kept (rows share columns, and a row's window
    moves with its own position), but attention is handed only the columns from `start` on, the
    oldest any position of the step can see; the step's mask (`Decoder._step`) hides the rest of
    what lies outside each position's window. A prefill cache of a prompt longer than the window
    holds only its last `sliding_window - 1` columns (transformers keeps no more); they are copied
    to the end of the prompt's columns, and the columns before them, zero, are never visible."""

    is_sliding = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, *, sliding_window: int,
                 rows: int | None = None) -> None:
        self.start = 0  # the first column attention is handed (set by the decoder before every step)
        super().__init__(keys, values, length, rows=rows)
        self.sliding_window = sliding_window

    def _expose(self) -> None:
        start = min(self.start, self.length)
        self.keys = self.keys_buf[: self.rows, :, start: self.length]
        self.values = self.values_buf[: self.rows, :, start: self.length]

    @property
    def cumulative_length(self) -> int:
        return self.length


class Lookup:
    """Prompt-lookup drafts for one row: `propose(k)` gives the (up to) k tokens that followed the
    latest earlier occurrence of the row's last `ngram` tokens, trying shorter tails down to one
    token; nothing where no tail occurred before. The index holds every n-gram but the current
    tail, so a proposal never points at the tail itself."""

    def __init__(self, tokens: Sequence[int], ngram: int = DRAFT_NGRAM) -> None:
        self.tokens = list(tokens)
        self.ngram = ngram
        self.seen: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ends
        for end in range(1, len(self.tokens)):
            self._index(end)

    def _index(self, end: int) -> None:
        for n in range(1, min(self.ngram, end) + 1):
            self.seen[tuple(self.tokens[end - n: end])] = end

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self._index(len(self.tokens) - 1)

    def propose(self, count: int) -> list[int]:
        if count <= 0:
            return []
        for n in range(min(self.ngram, len(self.tokens)), 0, -1):
            end = self.seen.get(tuple(self.tokens[-n:]))
            if end is not None:
                return self.tokens[end: end + count]
        return []


@dataclass
class Prefilled:
    """One prefill group: its rows' caches, last-position hidden states and padded width."""

    rows: list[int]
    cache: DynamicCache
    hidden: torch.Tensor  # (rows, hidden size), the final hidden state at each prompt's last token
    width: int
    mask: torch.Tensor  # (rows, width): 1 on each row's prompt, right-aligned


def sliding_window(config: object) -> int | None:
    """The window of the model's sliding layers, or None when it has none."""
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    return int(window) if window and "sliding_attention" in types else None


@dataclass(frozen=True)
class ScreenTrial:
    """The greedy head screen's one timing against the full output layer, on the same rows: at
    `TRIAL_SIZES` rows per call (`sizes`: rows, screen seconds, full layer seconds); `rows`,
    `screen_s` and `full_s` are the largest size's."""

    rows: int
    screen_s: float
    full_s: float
    kept: bool  # kept for some calls
    kind: str = "int4"  # which screen (worker/model/head_screen.py `choose_kind`)
    up_to: int | None = None  # the most rows per call it answers; None: every call (or dropped)
    sizes: list[tuple[int, float, float]] = field(default_factory=list)

    def covers(self, rows: int) -> bool:
        """Whether a kept screen answers a call of this many rows."""
        return self.up_to is None or rows <= self.up_to

    def seconds(self, rows: int, *, screen: bool) -> float:
        """A call's time at this many rows, screened or through the full layer: the trial's times,
        linear between its sizes and extended from the nearest two beyond them."""
        points = [(size, screen_s if screen else full_s) for size, screen_s, full_s in self.sizes]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if rows <= x1 or x1 == points[-1][0]:
                return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
        return points[0][1]

    def pieces(self, rows: int) -> int | None:
        """Rows per piece for a call over `up_to` that is faster screened in pieces of `up_to` rows
        than whole through the full layer (by `seconds`: on the 2-core AVX2 machine a call of 9 to
        16 rows is), else None."""
        if not self.kept or self.covers(rows) or len(self.sizes) < 2:
            return None
        whole, rest = divmod(rows, self.up_to)
        screened = whole * self.seconds(self.up_to, screen=True) + (self.seconds(rest, screen=True) if rest else 0.0)
        return self.up_to if screened < self.seconds(rows, screen=False) else None


class Decoder:
    """The prefill → merge → decode loop over one model. Stateless between calls, but for the
    greedy head's screen (built once greedy work has earned it) and its counters."""

    def __init__(self, lm: torch.nn.Module, *, pad_id: int, device: torch.device, screen: bool = True,
                 table: Int8Table | None = None, draft_tokens: int = DRAFT_TOKENS) -> None:
        self.lm = lm
        # Prompt-lookup drafts per greedy row and step (`DRAFT_TOKENS`); 0: one token per step.
        self.draft_tokens = draft_tokens
        self.drafted = 0  # draft tokens scored
        self.accepted = 0  # of them, the ones the model chose itself (kept)
        self.steps = 0  # decode steps (forward passes after the prefills)
        # The output layer's rows as int8 blocks (worker/model/table.py), where the loader found them
        # exact: the greedy head and its screens read those, never the fp32 table's pages.
        self.table = table
        self.config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.window = sliding_window(self.config)  # the sliding layers' window, None where there are none
        self.pad_id = pad_id
        self.device = device
        self.body = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        params = inspect.signature(self.body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self._pass_cache_position = "cache_position" in params
        self.vocab_block = VOCAB_BLOCK if device.type == "cpu" else int(self.config.vocab_size)
        self.screen_wanted = screen and head_screen.applies(self.head, device=device, softcap=self.softcap)
        self._screen: head_screen.Screen | None = None
        self.screened_rows = 0  # greedy rows the screen answered
        self.unsure_rows = 0  # rows the screen was asked about whose margin check sent them to the full fp32 layer
        self.full_rows = 0  # rows not offered to a screen: none built (yet), dropped, off, or a call over its `up_to`
        self.full_layer_s = 0.0  # time greedy rows spent in the full layer before the screen was built
        self.screen_trial: ScreenTrial | None = None  # the build's timing of screen against full layer
        # Greedy `generate` batches choose through `best_allowed` (`stashing`) where a screen could
        # stand in for the layer, whatever the setting: a CPU fp32 layer without bias or soft-capping,
        # whose greedy answer is a plain argmax of its rows' products.
        self.pick_applies = head_screen.applies(self.head, device=device, softcap=self.softcap)
        self.allowed_rows = 0  # greedy rows of `generate` batches scored on their permitted words alone
        self._stash: torch.Tensor | None = None
        log.info("greedy head: %s", f"bf16, int8 or int4 screen, built once the full output layer has taken {SCREEN_AFTER_S}s "
                 "and kept if faster" if self.screen_wanted else "full output layer")
        log.info("greedy rows: %s", f"up to {draft_tokens} prompt-lookup drafts a step (more when few rows are live)"
                 if draft_tokens else "one token a step, no drafts")

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | dict[str, torch.Tensor], positions: torch.Tensor,
                 cache: Cache, past: int, *, every: bool = False) -> torch.Tensor:
        """The final hidden state at each row's last position, or at every position (`every`); the
        output layer is applied apart."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._pass_cache_position:
            kwargs["cache_position"] = torch.arange(past, past + ids.shape[1], device=self.device)
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.last_hidden_state if every else out.last_hidden_state[:, -1, :]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits, as the model's own head computes them (for sampling and grammars)."""
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def screen(self) -> head_screen.Screen | None:
        """The greedy head's screen if it is built and turned on (`screen_wanted`), else None."""
        return self._screen if self.screen_wanted else None

    def ensure_screen(self, kind: str | None = None) -> head_screen.Screen | None:
        """Build the screen now if it applies and is turned on: of `kind`, or the kind this CPU runs
        faster (`head_screen.choose_kind`: bf16 where it has bf16 units, 335 MB and about 0.1 s on 2
        cores; int8 where fbgemm's int8 kernel beats bf16's, 168 MB and about 3 s; else int4, 105 MB
        and about 1.5 s). None where none applies."""
        if self.screen_wanted and self._screen is None:
            started = time.monotonic()
            kind = kind or head_screen.choose_kind(self.head, self.table)
            if kind is None:
                self.screen_wanted = False
                log.info("greedy head: no screen applies, scoring every word in fp32")
                return None
            self._screen = head_screen.build(self.head, kind, self.table)
            log.info("greedy head screen built in %.1fs (%s copy of the output layer, candidates re-scored in fp32)",
                     time.monotonic() - started, kind)
        return self.screen

    def best(self, hidden: torch.Tensor) -> list[int]:
        """The greedy token per row: through the head's screen where it applies (worker/model/head_screen.py),
        rows it cannot vouch for through the full output layer (`best_blocked`). The screen is built
        once the full layer has taken `SCREEN_AFTER_S` in greedy rows, and kept only if it beats the
        full layer on that step's rows (`try_screen`); a call over the rows it won at is screened in
        pieces where that is faster by the trial's times (`ScreenTrial.pieces`), else scored in full."""
        screen = self.screen
        if screen is None and self.screen_wanted and self.screen_trial is None and self.full_layer_s >= SCREEN_AFTER_S:
            return self.try_screen(hidden)
        if screen is not None and (self.screen_trial is None or self.screen_trial.covers(hidden.shape[0])):
            return self._screened(screen, hidden)
        piece = self.screen_trial.pieces(hidden.shape[0]) if screen is not None else None
        if piece is not None:
            return [token for start in range(0, hidden.shape[0], piece)
                    for token in self._screened(screen, hidden[start: start + piece])]
        started = time.monotonic()
        out = self._full(hidden)
        if screen is None and self.screen_wanted:
            self.full_layer_s += time.monotonic() - started
        return out

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """While open, the full output layer's time is not greedy work: it neither counts towards the
        screen (`SCREEN_AFTER_S`) nor builds it, and a built screen is not used. For the engine's
        warm-up, whose first calls can be slow beside a busy process (a start once built and timed
        the screen there, 14 s of a 27 s start)."""
        wanted, self.screen_wanted = self.screen_wanted, False
        try:
            yield
        finally:
            self.screen_wanted = wanted

    @contextlib.contextmanager
    def stashing(self) -> Iterator[None]:
        """While open, the output layer's forward computes nothing: it keeps the final hidden state
        of each row's last position (`stashed`) and hands back placeholder logits, 0 for every word,
        for a greedy `generate`'s processors to mask; `decoding.GreedyRows`, last among them, then
        chooses through `best_allowed`. Only where `pick_applies`; one call at a time (the engine's
        thread)."""
        head = self.head
        own = head.__dict__.get("forward")  # the word table's forward, where it is installed

        def stash(hidden: torch.Tensor) -> torch.Tensor:
            self._stash = hidden[..., -1, :] if hidden.dim() == 3 else hidden
            return hidden.new_zeros(*hidden.shape[:-1], head.out_features)

        head.forward = stash
        try:
            yield
        finally:
            self._stash = None
            if own is None:
                del head.forward
            else:
                head.forward = own

    def stashed(self) -> torch.Tensor:
        """The final hidden states the output layer kept in this step (`stashing`), one row per row."""
        if self._stash is None:
            raise RuntimeError("no hidden state kept: the output layer ran outside `stashing`")
        return self._stash

    def best_allowed(self, hidden: torch.Tensor, allowed: Permitted) -> list[int]:
        """The greedy token per row among the words `allowed` permits (one position a row): the
        argmax of the full layer's logits with the others at -inf (ties to the lowest id; 0 where
        nothing is permitted, as argmax gives over -inf). A row permitted at most `ALLOWED_DIRECT`
        words is scored on those alone, from the layer's fp32 rows; the others take the unmasked
        greedy token (`best`, the screen where it applies) when it is permitted, which is then the
        masked answer too, and else the full layer's masked scores (`best_blocked`)."""
        counts = allowed.counts()
        out = [0] * len(counts)
        source = rows_of(self.head, self.table)
        wide = []
        for r, count in enumerate(counts):
            if count > ALLOWED_DIRECT:
                wide.append(r)
            elif count:
                ids = allowed.words(r)
                out[r] = int(ids[int(scores(hidden[r: r + 1], source.rows(ids)).argmax())])
                self.allowed_rows += 1
        if wide:
            first = self.best(hidden[wide])
            missed = []
            for r, token in zip(wide, first):
                if allowed.has(r, token):
                    out[r] = token
                else:
                    missed.append(r)
            if missed:
                for r, token in zip(missed, self.best_blocked(hidden[missed], allowed=allowed.dense(missed))):
                    out[r] = token
        return out

    def _full(self, hidden: torch.Tensor) -> list[int]:
        """`best_blocked`, counted in `full_rows`."""
        self.full_rows += hidden.shape[0]
        return self.best_blocked(hidden)

    def try_screen(self, hidden: torch.Tensor) -> list[int]:
        """Build the screen and time it against the full layer at each of `TRIAL_SIZES` rows per
        call (these rows, repeated or cut to that many), alternating, best of `TRIAL_ROUNDS` each;
        keep it for calls up to the largest size at which it was faster, for every call if that is
        the largest size, else drop it. The screens' speed depends on the CPU: on the 2-core AVX2
        machine of docs/PERFORMANCE.md the int4 screen beats the full layer for one prompt and
        loses from about 16 rows on; on a 2-core AVX-512/AMX machine the int4 kernel is about as
        fast as fp32 there, and the bf16 screen (the one `choose_kind` picks on it) is faster.
        Returns these rows' tokens."""
        screen = self.ensure_screen()
        if screen is None:
            return self._full(hidden)
        rows = hidden.shape[0]
        sizes = []
        for size in TRIAL_SIZES:
            probe = hidden.repeat(-(-size // rows), 1)[:size]
            screen_s, full_s = [], []
            for _ in range(TRIAL_ROUNDS):
                started = time.monotonic()
                self.best_blocked(probe)
                full_s.append(time.monotonic() - started)
                started = time.monotonic()
                screen.best(probe)
                screen_s.append(time.monotonic() - started)
            sizes.append((size, min(screen_s), min(full_s)))
        won = [size for size, screen_s, full_s in sizes if screen_s < full_s]
        largest = sizes[-1]
        trial = self.screen_trial = ScreenTrial(
            rows=largest[0], screen_s=largest[1], full_s=largest[2], kept=bool(won), kind=screen.kind,
            up_to=None if not won or won[-1] == largest[0] else won[-1], sizes=sizes)
        log.info("greedy head: %s screen against the full layer, ms per call: %s: %s", trial.kind,
                 ", ".join(f"{size} rows {s * 1000:.1f} / {f * 1000:.1f}" for size, s, f in sizes),
                 "dropped, scoring every word in fp32" if not trial.kept else
                 "screening every call" if trial.up_to is None else f"screening calls of up to {trial.up_to} rows")
        if not trial.kept:
            self._screen = None  # its memory goes back
        return self.best(hidden)

    def _screened(self, screen: head_screen.Screen, hidden: torch.Tensor) -> list[int]:
        ids, sure = screen.best(hidden)
        unsure = (~sure).nonzero().squeeze(1)
        self.screened_rows += hidden.shape[0] - unsure.numel()
        if unsure.numel():
            self.unsure_rows += unsure.numel()
            ids[unsure] = torch.tensor(self.best_blocked(hidden[unsure]), dtype=ids.dtype)
        return ids.tolist()

    def best_blocked(self, hidden: torch.Tensor, allowed: torch.Tensor | None = None) -> list[int]:
        """The greedy token per row from the full output layer, in vocabulary blocks with a running
        maximum. The same dot products over the hidden size as `logits` (`table.scores`), a fraction
        of the memory traffic; ties go to the lowest token id, as `argmax` breaks them. `allowed`
        (bool, rows x vocabulary): only those words compete (the others score -inf)."""
        if not isinstance(self.head, torch.nn.Linear):  # a quantized head: its own kernel, whole
            logits = self.logits(hidden)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            return logits.argmax(dim=-1).tolist()
        bias = self.head.bias
        best_score = torch.full((hidden.shape[0],), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        best_id = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        for start, rows in rows_of(self.head, self.table).blocks(self.vocab_block):
            block = scores(hidden, rows)
            if bias is not None:
                block = block + bias[start: start + rows.shape[0]]
            if self.softcap is not None:
                block = torch.tanh(block / self.softcap) * self.softcap
            if allowed is not None:
                block = block.masked_fill(~allowed[:, start: start + rows.shape[0]], float("-inf"))
            score, index = block.max(dim=-1)
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_id = torch.where(better, index + start, best_id)
        return best_id.tolist()

    def prefill(self, rows: Sequence[Sequence[int]], group: list[int]) -> Prefilled:
        width = max(len(rows[i]) for i in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for j, i in enumerate(group):
            ids[j, width - len(rows[i]):] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers a left-padded row
        cache = DynamicCache(config=self.config)
        hidden = self._forward(ids, mask, positions, cache, 0)
        return Prefilled(rows=group, cache=cache, hidden=hidden, width=width, mask=mask)

    def merge(self, groups: Iterable[Prefilled], *, width: int, total: int, rows: int | None = None) -> Cache:
        """One cache for all groups' rows (in the order of `groups`), right-aligned at `width` (the
        widest group's), with room for `total` positions and `rows` rows (default: the groups'). Each
        group's cache is freed as it is copied, and the next group is taken only then, so where
        `groups` prefills as it goes (`_session`) one prefill cache at a time is held beside the
        merged one, not all of them (about 0.55 GB for the first batch of the bench's 64 prompts,
        docs/PERFORMANCE.md)."""
        if rows is None:
            groups = list(groups)
            rows = sum(len(g.rows) for g in groups)
        window = self.window
        keys_bufs: list[torch.Tensor] = []
        values_bufs: list[torch.Tensor] = []
        sliding: list[bool] = []
        batch = 0
        for g in groups:
            n = len(g.rows)
            if not keys_bufs:  # shapes from the first group's layers
                for layer in g.cache.layers:
                    heads, dim = layer.keys.shape[1], layer.keys.shape[3]
                    keys_bufs.append(torch.zeros((rows, heads, total, dim), dtype=layer.keys.dtype, device=self.device))
                    values_bufs.append(torch.zeros_like(keys_bufs[-1]))
                    sliding.append(bool(getattr(layer, "is_sliding", False)))
            if batch + n > rows:
                raise ValueError(f"merging {batch + n} rows into a cache of {rows}")
            for index, layer in enumerate(g.cache.layers):
                kept = layer.keys.shape[2]  # a sliding layer keeps only its window's last columns
                keys_bufs[index][batch: batch + n, :, width - kept: width] = layer.keys
                values_bufs[index][batch: batch + n, :, width - kept: width] = layer.values
                layer.keys = layer.values = torch.empty(0, dtype=layer.keys.dtype, device=self.device)
            batch += n
        layers: list[_SlotLayer] = []
        for keys, values, is_sliding in zip(keys_bufs, values_bufs, sliding):
            if is_sliding:
                layers.append(_SlidingSlotLayer(keys, values, width, sliding_window=window or total + 1, rows=batch))
            else:
                layers.append(_SlotLayer(keys, values, width, rows=batch))
        return Cache(layers=layers)

    def run(self, rows: Sequence[Sequence[int]], groups: list[list[int]], *, max_new_tokens: int,
            choose: Callable[[torch.Tensor, list[int]], list[int]] | None,
            finished: Callable[[int, list[int]], bool], slots: int | None = None,
            max_rows: int | None = None, rules: Rules | None = None) -> dict[int, list[int]]:
        """Generated ids of each row the `groups` name (indices into `rows`), up to `max_new_tokens` each.

        Groups are prefill groups, longest prompts first, taken in order: the first ones are merged
        and decoded together, as many rows as `slots` key/value positions hold at the first group's
        width plus the new tokens (at most `max_rows`; all rows when `slots` is None). As rows
        finish, the next groups are prefilled and join the running batch in their place
        (continuous batching), so the decode step stays full while work is waiting. A batch that
        empties before the next group joins ends, and the next starts at its own width.

        `choose(logits, live_rows)` picks the next token of each live row from its logits (None:
        greedy, through `best`, without materialising the logits);
        `finished(row, ids)` says whether a row has ended (its last id was end-of-sequence, a stop
        string appeared). Finished rows keep their ids and leave the batch. `rules` (greedy only):
        each row takes the best word its rules permit (`best_allowed`), drafts checked position by
        position against the rules' state after the drafts before them."""
        if rules is not None and choose is not None:
            raise ValueError("rules apply to greedy rows only")
        pending = list(groups)
        out: list[list[int]] = [[] for _ in rows]
        drafting = self.draft_tokens if choose is None else 0  # columns a row's drafts need past its new tokens
        while pending:
            width = max(len(rows[i]) for i in pending[0])

            def rows_held(slack: int) -> int:
                if slots is None:
                    return sum(map(len, pending))
                return max(1, min(max_rows or slots, slots // (width + max_new_tokens + slack + drafting)))

            # Work that will wait needs spare columns to join into: as many as the new tokens, so
            # a newcomer fits beside rows that have just started (fewer rows at once, in exchange).
            slack = 0 if sum(map(len, pending)) <= rows_held(0) else max_new_tokens
            capacity = rows_held(slack)
            first = [pending.pop(0)]
            while pending and sum(map(len, first)) + len(pending[0]) <= capacity:
                first.append(pending.pop(0))
            self._session(rows, first, pending, capacity=capacity, slack=slack if pending else 0,
                          max_new_tokens=max_new_tokens, drafting=drafting, choose=choose, finished=finished,
                          out=out, rules=rules)
        return {i: out[i] for g in groups for i in g}

    def _pick(self, hidden: torch.Tensor, live: list[int],
              choose: Callable[[torch.Tensor, list[int]], list[int]] | None, rules: Rules | None = None) -> list[int]:
        if rules is not None:
            return [t for (t,) in self._ruled(hidden, [(row, []) for row in live], rules)]
        return self.best(hidden) if choose is None else choose(self.logits(hidden), live)

    def _ruled(self, hidden: torch.Tensor, rows: list[tuple[int, list[int]]], rules: Rules) -> list[list[int]]:
        """Per (row, drafts), the best permitted word at the row's position and after each draft
        (`hidden`: one state per position, in order), the rules' state after the drafts before it
        deciding what is permitted (one `best_allowed` call); the rules then take the row's tokens
        up to and including its first that differs from a draft."""
        tokens = self.best_allowed(hidden, rules.allowed(rows))
        out, at = [], 0
        for row, drafts in rows:
            out.append(tokens[at: at + len(drafts) + 1])
            at += len(drafts) + 1
            for j, token in enumerate(out[-1]):
                rules.accept(row, token)
                if j == len(drafts) or token != drafts[j]:
                    break
        return out

    def _session(self, rows: Sequence[Sequence[int]], first: list[list[int]], pending: list[list[int]], *,
                 capacity: int, slack: int, max_new_tokens: int, drafting: int,
                 choose: Callable[[torch.Tensor, list[int]], list[int]] | None,
                 finished: Callable[[int, list[int]], bool], out: list[list[int]], rules: Rules | None = None) -> None:
        """One merged batch: `first` decoded together, groups from `pending` joining as room frees
        (`slack` spare columns past the first rows' prompts and new tokens). Greedy rows feed their
        prompt-lookup drafts with their token (`drafting` at least, 0 for sampled rows), so rows advance by different
        numbers of tokens a step: each row writes from its own column on (`ends`) under a mask
        built here, causal within the step's positions."""
        order = [i for g in first for i in g]  # batch row -> index into `rows`
        width = max(len(rows[i]) for i in order)  # the widest group's prefill width
        # columns of the cache: a row needs its prompt + new tokens, and room for a step's drafts
        total = width + max_new_tokens + slack + drafting
        last: list[torch.Tensor] = []

        def prefilled() -> Iterator[Prefilled]:  # one group at a time, merged before the next
            for g in first:
                pre = self.prefill(rows, g)
                last.append(pre.hidden)
                yield pre

        # rows for every row the batch may hold once waiting work joins (`capacity`), so rows
        # leaving and joining rewrite the cache in place (`_rebuild`)
        cache = self.merge(prefilled(), width=width, total=total, rows=max(capacity, len(order)) if pending else len(order))
        hidden = torch.cat(last)[:, None, :]  # (rows, positions, hidden size)
        del last
        mask = torch.zeros((len(order), total), dtype=torch.bool, device=self.device)  # columns holding a row's tokens
        for b, i in enumerate(order):
            mask[b, width - len(rows[i]): width] = True
        positions = torch.tensor([len(rows[i]) for i in order], dtype=torch.long, device=self.device)
        ends = torch.full((len(order),), width, dtype=torch.long, device=self.device)  # where each row writes next
        starts = [width - len(rows[i]) for i in order]  # first column each batch row uses
        fed = [0] * len(order)  # 1 where a row fed its token in the last step (0 after a prefill)
        drafts: list[list[int]] = [[] for _ in order]  # the drafts each row fed in the last step
        lookups = {i: Lookup(rows[i]) for i in order} if drafting else {}
        alive = list(range(len(order)))  # batch rows still generating

        while True:
            feeds: list[list[int]] = [[self.pad_id] for _ in order]
            still, kept = [], []
            for b, chosen in zip(alive, self._verify(hidden, alive, drafts, [order[b] for b in alive], choose, rules)):
                row, draft = order[b], drafts[b]
                agreed = 0
                while agreed < len(draft) and chosen[agreed] == draft[agreed]:
                    agreed += 1
                self.drafted += len(draft)
                self.accepted += agreed
                kept.append((b, fed[b] + agreed))  # columns that now hold the row's own tokens: its fed one, the kept drafts
                goes_on = True
                for token in [*draft[:agreed], chosen[agreed]]:
                    if row in lookups:
                        lookups[row].append(token)
                    if not _goes_on(out, row, token, max_new_tokens, finished):
                        goes_on = False
                        break
                if goes_on:
                    still.append(b)
                    feeds[b] = [token]
            for b, valid in kept:
                if valid:
                    mask[b, int(ends[b]): int(ends[b]) + valid] = True
                    ends[b] += valid
                    positions[b] += valid
            if not still:
                return  # the next session (if work waits) starts with its own width
            column = int(ends[still].max())
            joining, shift = self._joining(rows, pending, still=len(still), capacity=capacity, column=column,
                                           total=total, starts=[starts[b] for b in still],
                                           max_new_tokens=max_new_tokens + drafting)
            if joining or len(still) < COMPACT_BELOW * len(order):
                feed_new, rows_new, groups_new = self._admit(rows, joining, choose, finished, out, max_new_tokens, rules)
                keep = torch.tensor(still, device=self.device)
                feeds = [feeds[b] for b in still] + [[t] for t in feed_new]
                mask = self._rebuild(cache, mask, keep, shift=shift, column=column, total=total,
                                     joining=groups_new)
                positions = torch.cat([positions[keep], torch.tensor([len(rows[i]) for i in rows_new],
                                                                     dtype=torch.long, device=self.device)])
                ends = torch.cat([ends[keep] - shift, torch.full((len(rows_new),), column - shift, dtype=torch.long,
                                                                  device=self.device)])
                starts = [starts[b] - shift for b in still] + [column - shift - len(rows[i]) for i in rows_new]
                for i in rows_new:
                    if drafting:
                        lookups[i] = Lookup([*rows[i], *out[i]])
                order = [order[b] for b in still] + rows_new
                alive = list(range(len(order)))
            else:
                alive = still
            drafts = [[] for _ in order]
            if drafting:
                # as many drafts as the step's positions allow, and the columns left to the furthest row
                most = min(max(drafting, DRAFT_POSITIONS // len(alive) - 1), DRAFT_MAX, total - int(ends[alive].max()) - 1)
                for b in alive:
                    drafts[b] = lookups[order[b]].propose(min(most, max_new_tokens - len(out[order[b]]) - 1))
                    if rules is not None:
                        drafts[b] = rules.permitted(order[b], drafts[b])
                    feeds[b] = feeds[b] + drafts[b]
            hidden = self._step(cache, feeds, mask, positions, ends, total)
            fed = [1] * len(order)
            self.steps += 1

    def _verify(self, hidden: torch.Tensor, alive: list[int], drafts: list[list[int]], live: list[int],
                choose: Callable[[torch.Tensor, list[int]], list[int]] | None,
                rules: Rules | None = None) -> list[list[int]]:
        """Per live batch row, the model's token after its fed token and after each of its drafts
        (the positions of the last step that row used): greedy through `best`, all rows' positions in
        one call; sampled rows (no drafts) through `choose`. Under `rules`, each position's best
        permitted word given the drafts before it (`best_allowed`, all positions in one call); the
        rules then take the row's tokens up to and including its first that differs from a draft."""
        if choose is not None:
            return [[t] for t in choose(self.logits(hidden[alive, 0]), live)]
        index_b = [b for b in alive for _ in range(len(drafts[b]) + 1)]
        index_j = [j for b in alive for j in range(len(drafts[b]) + 1)]
        if rules is not None:
            return self._ruled(hidden[index_b, index_j], [(row, drafts[b]) for b, row in zip(alive, live)], rules)
        tokens = self.best(hidden[index_b, index_j])
        out, at = [], 0
        for b in alive:
            n = len(drafts[b]) + 1
            out.append(tokens[at: at + n])
            at += n
        return out

    def _step(self, cache: Cache, feeds: list[list[int]], mask: torch.Tensor, positions: torch.Tensor,
              ends: torch.Tensor, total: int) -> torch.Tensor:
        """One decode forward: row b feeds `feeds[b]` (its token, then its drafts; padded to the
        longest), written from column `ends[b]`, each position seeing the row's columns in `mask`
        and the step's positions up to its own. Returns the hidden states, (rows, positions, size)."""
        q = max(len(f) for f in feeds)
        ids = torch.tensor([f + [self.pad_id] * (q - len(f)) for f in feeds], dtype=torch.long, device=self.device)
        steps = torch.arange(q, device=self.device)
        write_at = ends.clamp(max=total - q)  # rows that ended write nowhere that matters, inside the buffer
        width = int(write_at.max()) + q
        columns = torch.arange(width, device=self.device)
        at = write_at[:, None] + steps  # (rows, positions): the column each position is written to
        new = (columns >= write_at[:, None, None]) & (columns <= at[:, :, None])
        visible = mask[:, None, :width] | new  # (rows, positions, columns)
        masks = {"full_attention": visible[:, None], "sliding_attention": visible[:, None]}
        window = self.window
        start = 0
        if window is not None and width - 1 >= window:  # else every column is inside every position's window
            # A row's columns are its positions shifted by one offset, so a position sees a column
            # as transformers' sliding mask sees a key (kv > q - window) when column > its column -
            # window; no position of this step sees a column before `start`.
            start = max(0, int(write_at.min()) - window + 1)
            inside = columns[start:] > at[:, :, None] - window
            masks["sliding_attention"] = (visible[:, :, start:] & inside)[:, None]
        for layer in cache.layers:
            layer.write_at = write_at
            if isinstance(layer, _SlidingSlotLayer):
                layer.start = start
        return self._forward(ids, masks, positions[:, None] + steps, cache, int(write_at.min()), every=True)

    def _joining(self, rows: Sequence[Sequence[int]], pending: list[list[int]], *, still: int, capacity: int,
                 column: int, total: int, starts: list[int], max_new_tokens: int) -> tuple[list[list[int]], int]:
        """The waiting groups that join now, and how far every row must move left to make room for
        their new tokens (0 when none join): only once a quarter of the batch is free (a prefill of
        a few rows costs nearly what a larger one does), as many as the free rows hold, and only if
        the columns allow: a newcomer's prompt must end at the current column and its new tokens
        fit before the end, after moving every live row left past the columns none of them uses."""
        if not pending or still >= COMPACT_BELOW * capacity:
            return [], 0
        shift = max(0, column + max_new_tokens - total)
        if shift > min(starts):  # the columns no live row uses are too few
            return [], 0
        joining: list[list[int]] = []
        room = capacity - still
        while pending and len(pending[0]) <= room and max(len(rows[i]) for i in pending[0]) <= column - shift:
            room -= len(pending[0])
            joining.append(pending.pop(0))
        return joining, shift if joining else 0

    def _admit(self, rows: Sequence[Sequence[int]], joining: list[list[int]],
               choose: Callable[[torch.Tensor, list[int]], list[int]] | None,
               finished: Callable[[int, list[int]], bool], out: list[list[int]], max_new_tokens: int,
               rules: Rules | None = None) -> tuple[list[int], list[int], list[tuple[Prefilled, list[int]]]]:
        """Prefill the joining groups and pick each row's first token: (tokens to feed, the rows that
        go on, and per group its prefill with the positions in it of the rows that go on)."""
        feed: list[int] = []
        going_rows: list[int] = []
        groups: list[tuple[Prefilled, list[int]]] = []
        for group in joining:
            pre = self.prefill(rows, group)
            tokens = self._pick(pre.hidden, list(group), choose, rules)
            keep = []
            for j, (i, t) in enumerate(zip(group, tokens)):
                if _goes_on(out, i, t, max_new_tokens, finished):
                    keep.append(j)
                    feed.append(t)
                    going_rows.append(i)
            groups.append((pre, keep))
        return feed, going_rows, groups

    def _rebuild(self, cache: Cache, mask: torch.Tensor, keep: torch.Tensor, *, shift: int, column: int,
                 total: int, joining: list[tuple[Prefilled, list[int]]]) -> torch.Tensor:
        """Rebuild the batch's cache in place and return its new mask: only the `keep` rows, every
        column moved `shift` left, and the joining groups' rows appended, each prompt ending at the
        (moved) current column; every other column of those rows zero, as a new cache's. The buffers
        are the session's own (`merge` sized them for the most rows it may hold), so nothing the
        size of the cache is allocated: allocating a new one each time left the C heap holding freed
        buffers of every size (RSS 0.3 GB higher after the bench's 64 prompts, docs/PERFORMANCE.md)."""
        added = sum(len(k) for _, k in joining)
        kept = len(keep)
        end = column - shift
        if cache.layers and kept + added > cache.layers[0].keys_buf.shape[0]:
            raise ValueError(f"rebuilding {kept + added} rows into a cache of {cache.layers[0].keys_buf.shape[0]}")
        for index, layer in enumerate(cache.layers):
            for name in ("keys_buf", "values_buf"):
                buf = getattr(layer, name)
                moved = buf[:, :, shift:column].index_select(0, keep)  # before any row is overwritten
                buf[:kept, :, :end] = moved
                del moved
                buf[:kept, :, end:] = 0
                row = kept
                for pre, rows_kept in joining:
                    if rows_kept:
                        src = pre.cache.layers[index]
                        part = (src.keys if name == "keys_buf" else src.values)[rows_kept]
                        n = len(rows_kept)
                        buf[row: row + n] = 0
                        buf[row: row + n, :, end - part.shape[2]: end] = part
                        row += n
            layer.rows = kept + added
            layer.length = end
            layer._expose()
        new_mask = torch.zeros((kept + added, total), dtype=mask.dtype, device=mask.device)
        new_mask[:kept, :end] = mask.index_select(0, keep)[:, shift:column]
        row = kept
        for pre, rows_kept in joining:
            for j in rows_kept:
                new_mask[row, end - pre.width: end] = pre.mask[j]
                row += 1
        return new_mask


def _goes_on(out: list[list[int]], row: int, token: int, max_new_tokens: int,
             finished: Callable[[int, list[int]], bool]) -> bool:
    """Append a row's new token; whether the row still has tokens to generate."""
    out[row].append(token)
    return len(out[row]) < max_new_tokens and not finished(row, out[row])
