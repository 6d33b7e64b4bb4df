"""The greedy output layer on CPU through a cheaper screen, answering what the fp32 layer answers.

Three screens (`choose_kind` times which kernel runs fastest here): a bf16 copy of the layer
(`Bf16Screen`) where the CPU multiplies bf16 faster than fp32 (AMX or AVX-512 bf16 units), with a
worst-case bound; an int8 copy run by fbgemm's int8 kernel (`Int8Screen`, the kernel behind
`--quantize int8`), with a statistical margin; else a 4-bit copy (`HeadScreen`), with a statistical
margin. Each re-scores its candidates in fp32 from the layer's own weights and hands rows it cannot
vouch for to the full layer.

The int4 screen:

A decode step's output layer (262,144 words x 640) is the largest matmul of the step. For the
greedy token only the best word matters, so: score every word with a 4-bit copy of the layer
(`aten._weight_int4pack_mm_for_cpu`, the kernel of `--quantize int4`, several times faster than
fp32 `linear` at decode sizes), take the `CANDIDATES` best, score those again in fp32 from the
layer's own weights, and keep the best of them. The answer is then the fp32 layer's answer unless
a word outside the candidates scores higher in fp32 than every candidate, which needs that word's
screen error to exceed the gap between its screen score and the best fp32 candidate. Each row
checks, before its answer is used, that every word outside the candidates stays below the best
candidate's fp32 score by more than a margin:

    screen score + |screen score| * 2^-8           (the kernel's bf16 output rounding, at most 2^-9)
                 + SIGMAS * ||hidden|| * ||w_int4 - w|| / sqrt(hidden size)   <  best candidate

The last term is SIGMAS times the size a word's error (hidden . (w_int4 - w)) has when its
quantization residual points in no particular direction relative to the hidden state. A cheap
check first takes the lowest candidate's screen score and the largest residual of any word; only
rows that fail it are checked word by word. It is not a worst-case bound (that, ||hidden|| * ||residual||, is
about 25 times larger and keeps tens of thousands of words as candidates: docs/PERFORMANCE.md);
measured over the bench's 64 prompts (4,096 decode states x 262,144 words) the largest error was
5.9 such units at the word's own residual. A row whose gap is below the margin (a flat
distribution over many words) is answered by the fp32 layer in full, as without the screen.

The bf16 screen scores every word with bf16 copies of the hidden state and the layer (fp32
accumulation, bf16 output), and keeps as candidates the words within twice a bound `E` of the
row's best screen score. Rounding each operand to bf16 moves it by at most 2^-8 of itself, so each
product moves by at most 2^-7 + 2^-16 of |w_i x_i|, and the fp32 sum over 640 terms adds under
2^-14 of the sum of |w_i x_i|, itself at most ||w|| ||x||; the bf16 output moves the score by
at most 2^-8 of itself. Per row, with the largest word norm and the largest screen score:

    E = |screen score|max * 2^-7 + (2^-7 + 2^-12) * ||hidden|| * max ||w||

A word outside the candidates scores below (best screen score - 2E) + E in fp32, below the fp32
score of the screen's best word, itself a candidate: the fp32 best of the candidates is the fp32
layer's answer, with no statistics involved. A row with more than `MAX_CANDIDATES` candidates
(a flat distribution) goes to the full layer. Both bf16 and int8 re-score their candidates in two
rounds (`pick`): the best fp32 score among those within E of the best screen score rules out every
other candidate whose screen score is more than E below it, so only the few left are scored.

The int8 screen holds each word as int8 codes with one scale per word (fbgemm's per-channel
layout; the word table's own codes have a scale per 32 values, so the codes are made again) and
scores every word with `quantized::linear_dynamic`, which quantizes its input to 7-bit codes over
the call's range (one scale for all rows), multiplies in integers and hands back fp32. Each row is
first divided by its largest value, so every row's input codes span the range. A word's error has
two parts: the hidden state times the word's quantization residual, and the input's rounding
(uniform within half a step, each value on its own) times the word's codes. Sized as for int4,
each as if it pointed in no particular direction, with the largest residual and the largest word
norm of the layer, a row's unit is

    sqrt((||hidden|| * max ||w_int8 - w|| / sqrt(hidden size))^2 + (step * max |hidden| * max ||w_int8|| / sqrt(12))^2)

and `E` is SIGMAS such units. Candidates are the words within 2E of the row's best screen score, as
for bf16, and the row is sure when the best candidate's fp32 score beats every other word's screen
score plus E (as for int4, a margin, not a worst case; over 1,024 real decode states of the bench's
prompts x 262,144 words the largest error was 5.1 units, docs/PERFORMANCE.md).

`Settings.head_screen` (`--no-head-screen`) turns them off; they are used only where they apply: a
CPU `nn.Linear` fp32 head without bias or logit soft-capping (int4 also needs the kernel and its
shapes, int8 fbgemm's engine)."""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from worker.model import int4
from worker.model.table import rows_of

if TYPE_CHECKING:
    from worker.model.table import Int8Table, WeightRows

CANDIDATES = 256  # words re-scored in fp32 per row (int4)
SIGMAS = 8.0
ROUNDING = 2.0 ** -8

BF16_OUTPUT = 2.0 ** -7  # the bf16 output's rounding, with room (2^-8 relative, of the exact value)
BF16_PRODUCTS = 2.0 ** -7 + 2.0 ** -12  # operand rounding and fp32 accumulation, per ||w|| ||x||
MAX_CANDIDATES = 4096  # more in a row and the full layer scores it (bf16, int8)
RULE_OUT_SLACK = 2.0 ** -20  # `pick`'s second round keeps this much more than its bound asks (fp32 rounding)
RULE_OUT = True  # `pick` in two rounds; False re-scores every candidate (the baseline bench/head.py times)
BF16_BLOCK = 16384  # words per block of bf16 screen scores (rows x block stays in cache)
INT8_BLOCK = 16384  # words per packed block of the int8 screen
INT8_LEVELS = 127  # steps of the int8 kernel's input codes over the call's range (fbgemm's reduce_range: 0..127)
# Prefer the bf16 or int8 screen only where its kernel beats fp32 `linear` by this much on a slice
# of the layer (`choose_kind`): bf16 without bf16 units (AVX2) is about 100 times slower, with AMX
# 3-10 times faster; fbgemm's int8 ran 2.8-10x faster than fp32 on a 2-core AVX-512 AMD EPYC.
FASTER = 1.5
PROBE_WORDS, PROBE_ROWS = 4096, 32


def applies(head: torch.nn.Module, *, device: torch.device, softcap: float | None) -> bool:
    """Whether a screen can stand in for this output layer (see the module docstring)."""
    return (device.type == "cpu" and type(head) is torch.nn.Linear and head.bias is None and softcap is None
            and head.weight.dtype == torch.float32 and head.weight.shape[0] > CANDIDATES)


def int4_applies(head: torch.nn.Linear) -> bool:
    """Whether PyTorch's int4 CPU kernel takes this layer (the int4 screen's needs beyond `applies`)."""
    return (int4.supported(head) and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def int8_applies() -> bool:
    """Whether fbgemm's int8 kernel runs here (the quantized engine of x86 builds of PyTorch, whose
    input codes `INT8_LEVELS` describes) and still takes the quantized tensors it is packed from
    (deprecated in PyTorch 2.13: where they are gone, the other screens serve)."""
    return (torch.backends.quantized.engine in ("x86", "fbgemm") and hasattr(torch, "quantize_per_channel")
            and hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack"))


def int8_pack(rows: torch.Tensor) -> tuple[object, torch.Tensor]:
    """(fbgemm's packed int8 copy of these fp32 rows, one scale per row from its largest value;
    the copy's values in fp32)."""
    # the largest |value| per row, without an |rows| copy (a 42 MB block of the screen's build)
    scales = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg()).clamp_min(torch.finfo(torch.float32).tiny)
    scales = scales.div_(127).double()
    with warnings.catch_warnings():  # fbgemm's layers take these tensors (deprecated, not yet replaced)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        codes = torch.quantize_per_channel(rows, scales, torch.zeros(rows.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(codes, None), codes.dequantize()


def _speedup(head: torch.nn.Linear, table: Int8Table | None, rounds: int, make: Callable) -> float:
    """fp32 `linear` time over a cheaper kernel's (`make(weight)` gives it, a function of the rows)
    on `PROBE_WORDS` of the layer's words (read from `table` where there is one, so the fp32
    weight's pages stay where they are) and `PROBE_ROWS` rows, best of `rounds` each,
    alternating; a kernel four times slower in a timed round is settled there."""
    weight = rows_of(head, table).block(0, PROBE_WORDS).detach()
    cheaper = make(weight)
    rows = torch.randn(PROBE_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0))
    fp32_s, cheap_s = [], []
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms both kernels
            started = time.perf_counter()
            torch.nn.functional.linear(rows, weight)
            fp32_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            cheaper(rows)
            cheap_s.append(time.perf_counter() - started)
            if len(cheap_s) > 1 and cheap_s[-1] > 4 * fp32_s[-1]:
                break  # far slower: no need for the best of `rounds`
    return min(fp32_s[1:]) / max(min(cheap_s[1:]), 1e-9)


def bf16_speedup(head: torch.nn.Linear, *, rounds: int = 3, table: Int8Table | None = None) -> float:
    """fp32 over bf16 `linear` on a slice of the layer (`_speedup`; 8-14 ms in all on an
    AVX-512/AMX machine; about 20 ms there with oneDNN held to AVX2, `ONEDNN_MAX_CPU_ISA=AVX2`,
    where bf16 ran 5-7 times slower)."""
    def make(weight: torch.Tensor) -> Callable:
        low = weight.to(torch.bfloat16)
        return lambda rows: torch.nn.functional.linear(rows.to(torch.bfloat16), low)
    return _speedup(head, table, rounds, make)


def int8_speedup(head: torch.nn.Linear, *, rounds: int = 3, table: Int8Table | None = None) -> float:
    """fp32 `linear` over fbgemm's int8 kernel on a slice of the layer (`_speedup`)."""
    def make(weight: torch.Tensor) -> Callable:
        packed, _ = int8_pack(weight)
        return lambda rows: torch.ops.quantized.linear_dynamic(rows, packed, True)
    return _speedup(head, table, rounds, make)


def choose_kind(head: torch.nn.Linear, table: Int8Table | None = None) -> str | None:
    """The screen for this CPU: of bf16 and int8 (where fbgemm runs), the one whose kernel beats
    fp32 `linear` by most on a slice of the layer, if by at least `FASTER`; else "int4" where its
    kernel applies, else None."""
    speedups = {"bf16": bf16_speedup(head, table=table)}
    if int8_applies():
        speedups["int8"] = int8_speedup(head, table=table)
    kind = max(speedups, key=speedups.__getitem__)
    if speedups[kind] >= FASTER:
        return kind
    return "int4" if int4_applies(head) else None


def build(head: torch.nn.Linear, kind: str, table: Int8Table | None = None) -> Screen:
    """The screen of that kind (`choose_kind`) over this output layer (its fp32 rows read from
    `table` where the word table is held as int8 blocks, `worker/model/table.py`)."""
    screens = {"bf16": Bf16Screen, "int8": Int8Screen, "int4": HeadScreen}
    if kind not in screens:
        raise ValueError(f"no head screen of kind {kind!r}")
    return screens[kind](head, table)


class HeadScreen:
    """A 4-bit copy of one output layer and the fp32 re-scoring of its candidates."""

    kind = "int4"

    def __init__(self, head: torch.nn.Linear, table: Int8Table | None = None) -> None:
        # the layer's own fp32 rows (shared, not copied)
        self.source = rows_of(head, table)
        words, width = self.source.shape
        packed, scales, residuals = [], [], []
        with torch.no_grad():
            for start in range(0, words, int4.CHUNK_ROWS):
                rows = self.source.block(start, start + int4.CHUNK_ROWS)
                codes, so = int4.quantize_groups(rows, refits=0)
                residuals.append(torch.linalg.vector_norm(int4.dequantize(codes, so) - rows, dim=1))
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
                scales.append(so)
        self.packed = torch.cat(packed)
        self.scales_offsets = torch.cat(scales, dim=1)
        # one unit of each word's error size per unit of ||hidden||: ||w_int4 - w|| / sqrt(width)
        self.units = torch.cat(residuals) / math.sqrt(width)
        self.unit = float(self.units.max())

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every word's screen score (fp32 from the kernel's bf16 output)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(hidden.to(torch.bfloat16), self.packed, int4.GROUP,
                                                          self.scales_offsets).float()

    def best(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the best candidate per row by fp32 score, ties to the lowest id; whether the row is sure:
        no word outside the candidates comes within the margin of that best score)."""
        scores = self.scores(hidden)
        top = scores.topk(CANDIDATES, dim=1)
        exact = torch.bmm(self.source.rows(top.indices), hidden.unsqueeze(2)).squeeze(2)
        high = exact.max(dim=1).values
        ids = torch.where(exact == high[:, None], top.indices, torch.iinfo(torch.long).max).min(dim=1).values
        norms = torch.linalg.vector_norm(hidden, dim=1)
        # cheap check at the largest residual: every word outside scores at most the lowest candidate
        lowest = top.values[:, -1]
        sure = high > lowest + lowest.abs() * ROUNDING + SIGMAS * self.unit * norms
        unsure = (~sure).nonzero().squeeze(1)
        if unsure.numel():  # then word by word, at each word's own residual
            rest = scores[unsure]
            reach = rest + rest.abs() * ROUNDING + SIGMAS * norms[unsure, None] * self.units
            reach.scatter_(1, top.indices[unsure], float("-inf"))  # the candidates themselves
            sure[unsure] = high[unsure] > reach.max(dim=1).values
        return ids, sure


class Bf16Screen:
    """A bf16 copy of one output layer and the fp32 re-scoring of the words its bound cannot rule
    out (module docstring)."""

    kind = "bf16"

    def __init__(self, head: torch.nn.Linear, table: Int8Table | None = None) -> None:
        # the layer's own fp32 rows (shared, not copied)
        self.source = rows_of(head, table)
        words = self.source.shape[0]
        self.low = torch.empty(tuple(self.source.shape), dtype=torch.bfloat16)
        largest = 0.0
        with torch.no_grad():
            for start in range(0, words, int4.CHUNK_ROWS):  # by slices: no second fp32 table at once
                rows = self.source.block(start, start + int4.CHUNK_ROWS)
                self.low[start: start + rows.shape[0]] = rows.to(torch.bfloat16)
                largest = max(largest, float(torch.linalg.vector_norm(rows, dim=1).max()))
        self.largest_norm = largest

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every word's screen score (the bf16 kernel's bf16 output, in fp32), all at once."""
        return torch.nn.functional.linear(hidden.to(torch.bfloat16), self.low).float()

    def bound(self, hidden: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
        """Per row, `E`: no word's screen score is further than this from its fp32 score, given the
        row's largest screen score in magnitude (module docstring)."""
        return largest * BF16_OUTPUT + BF16_PRODUCTS * torch.linalg.vector_norm(hidden, dim=1) * self.largest_norm

    def best(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the best candidate per row by fp32 score, ties to the lowest id; whether the row is sure:
        it had at most `MAX_CANDIDATES` candidates, so its answer is the full layer's).

        The screen scores go by blocks of `BF16_BLOCK` words, each block's highest and lowest score
        per row taken while it is in cache; only blocks whose highest reaches a row's threshold are
        searched for candidates."""
        rows, words = hidden.shape[0], self.low.shape[0]
        low_hidden = hidden.to(torch.bfloat16)
        blocks, highs, lows = [], [], []
        for start in range(0, words, BF16_BLOCK):
            block = torch.nn.functional.linear(low_hidden, self.low[start: start + BF16_BLOCK])
            high, low = block.amax(dim=1), block.amin(dim=1)  # two passes: 3.5x faster than bf16 aminmax here
            blocks.append(block)
            highs.append(high)
            lows.append(low)
        high_t, low_t = torch.stack(highs, dim=1).float(), torch.stack(lows, dim=1).float()
        top = high_t.max(dim=1).values
        largest = torch.maximum(high_t.abs().max(dim=1).values, low_t.abs().max(dim=1).values)
        return pick(self.source, hidden, blocks, high_t, top, self.bound(hidden, largest), block_words=BF16_BLOCK)[:2]


class Int8Screen:
    """An int8 copy of one output layer in fbgemm's packed blocks and the fp32 re-scoring of the
    words its margin cannot rule out (module docstring)."""

    kind = "int8"

    def __init__(self, head: torch.nn.Linear, table: Int8Table | None = None) -> None:
        # the layer's own fp32 rows (shared, not copied)
        self.source = rows_of(head, table)
        words, self.width = self.source.shape

        def pack(start: int) -> tuple[object, float, float]:
            with torch.no_grad():
                rows = self.source.block(start, start + INT8_BLOCK)
                packed, values = int8_pack(rows)
                norm = float(torch.linalg.vector_norm(values, dim=1).max())
                return packed, float(torch.linalg.vector_norm(values.sub_(rows), dim=1).max()), norm

        # fbgemm's packing runs on one core and releases the GIL: one block per thread (a development
        # timing on 2 cores: the real 262,144-word layer, read from its int8 word table, took 3.1 s
        # to build against 4.8 s one block at a time)
        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            blocks = list(pool.map(pack, range(0, words, INT8_BLOCK)))
        self.packed = [packed for packed, _, _ in blocks]
        self.largest_residual = max(residual for _, residual, _ in blocks)
        self.largest_norm = max(norm for _, _, norm in blocks)

    @staticmethod
    def scaled(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows as the kernel takes them: each divided by its largest |value|, a row that is not
        finite as zeros; that largest value per row)."""
        finite = torch.isfinite(hidden).all(dim=1, keepdim=True)
        peak = torch.where(finite, hidden.abs().amax(dim=1, keepdim=True), 0.0).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(finite, hidden / peak, 0.0), peak.squeeze(1)

    def blocks(self, scaled: torch.Tensor) -> list[torch.Tensor]:
        """Every word's screen score per block, for the scaled rows (`scaled`)."""
        return [torch.ops.quantized.linear_dynamic(scaled, packed, True) for packed in self.packed]

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every word's screen score, all at once."""
        scaled, peak = self.scaled(hidden)
        return torch.cat(self.blocks(scaled), dim=1) * peak[:, None]

    def bound(self, hidden: torch.Tensor, scaled: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Per row, `E`: SIGMAS units of a word's error (module docstring), for a call of these rows."""
        step = (max(float(scaled.max()), 0.0) - min(float(scaled.min()), 0.0)) / INT8_LEVELS  # the call's input step
        weights = torch.linalg.vector_norm(hidden, dim=1) * self.largest_residual / math.sqrt(self.width)
        inputs = step * peak * self.largest_norm / math.sqrt(12)
        return SIGMAS * torch.sqrt(weights ** 2 + inputs ** 2)

    def best(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the best candidate per row by fp32 score, ties to the lowest id; whether the row is sure:
        finite, at most `MAX_CANDIDATES` candidates, and the best of them beats every other word's
        screen score by more than the margin)."""
        scaled, peak = self.scaled(hidden)
        blocks = self.blocks(scaled)
        highs = torch.stack([block.amax(dim=1) for block in blocks], dim=1)
        top = highs.max(dim=1).values
        margin = self.bound(hidden, scaled, peak) / peak  # in the blocks' units
        ids, sure, best_score = pick(self.source, hidden, blocks, highs, top, margin, block_words=INT8_BLOCK, scale=peak)
        # every word outside the candidates scores below top - 2 margin on the screen, so below
        # top - margin in fp32 by the margin's measure: the best candidate must beat that
        sure &= (best_score > (top - margin) * peak) & torch.isfinite(hidden).all(dim=1)
        return ids, sure


Screen = HeadScreen | Bf16Screen | Int8Screen


def pick(source: Int8Table | WeightRows, hidden: torch.Tensor, blocks: list[torch.Tensor], highs: torch.Tensor,
         top: torch.Tensor, margin: torch.Tensor, *, block_words: int,
         scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bf16 and int8 screens' search. A row's candidates are the words whose screen score
    reaches `top - 2 * margin` (in the blocks' units, which `scale` per row turns into fp32 scores;
    `top`: the row's best screen score; `highs`: each block's highest score per row, so only blocks
    that reach it are searched). Returns (the best candidate per row by fp32 score, ties to the
    lowest id; whether the row had 1 to `MAX_CANDIDATES` candidates; its fp32 score, -inf if not).

    Candidates are re-scored in fp32 in two rounds. First those within one margin of the top (the
    screen's best word among them); the best of their fp32 scores, `first`, then rules out every
    other candidate whose screen score is below `first - margin`, since its fp32 score is within the
    margin of its screen score, the measure by which every word outside the candidates was ruled out.
    Only the rest are scored. The answer is the one scoring every candidate gives; the rounds score
    a tenth of the words on real decode states (docs/PERFORMANCE.md, "Greedy head: two rounds")."""
    rows = hidden.shape[0]
    threshold = top - 2 * margin
    reach = highs >= threshold[:, None]  # (row, block) pairs that hold candidates
    found_rows, found_words, found_scores = [], [], []
    for b in reach.any(dim=0).nonzero().flatten().tolist():
        picked = reach[:, b].nonzero().flatten()
        block = (blocks[b] if picked.numel() == rows else blocks[b][picked]).float()
        row, word = (block >= threshold[picked, None]).nonzero().unbind(1)
        found_scores.append(block[row, word])
        found_rows.append(picked[row])
        found_words.append(word + b * block_words)
    if not found_rows:  # no finite scores anywhere: the full layer decides
        return (torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.bool),
                torch.full((rows,), float("-inf")))
    row, word, score = torch.cat(found_rows), torch.cat(found_words), torch.cat(found_scores)
    count = torch.bincount(row, minlength=rows)
    sure = (count > 0) & (count <= MAX_CANDIDATES)  # a row with none (not finite) is not vouched for
    kept = sure[row]
    row, word, score = row[kept], word[kept], score[kept]
    near = score >= (top - margin)[row] if RULE_OUT else torch.ones_like(row, dtype=torch.bool)

    def fp32(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, words, their fp32 scores) of the chosen candidates"""
        return row[chosen], word[chosen], (source.rows(word[chosen]) * hidden[row[chosen]]).sum(dim=1)

    def best_per_row(at: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.full((rows,), float("-inf"), dtype=values.dtype).scatter_reduce(0, at, values, "amax")

    first_row, first_word, first = fp32(near)
    # the first round's best in the blocks' units, less a hair for the rounding of this division and subtraction
    floor = best_per_row(first_row, first)
    if scale is not None:
        floor = floor / scale
    floor = floor - margin - (floor.abs() + margin) * RULE_OUT_SLACK
    rest_row, rest_word, rest = fp32(~near & (score >= floor[row]))
    row, word, exact = torch.cat([first_row, rest_row]), torch.cat([first_word, rest_word]), torch.cat([first, rest])
    best_score = best_per_row(row, exact)
    none = torch.iinfo(torch.long).max
    ids = torch.full((rows,), none, dtype=torch.long).scatter_reduce(
        0, row, torch.where(exact == best_score[row], word, none), "amin")
    return torch.where(sure, ids, 0), sure, best_score
