"""Per-row sampling, greedy choice and stop strings for batched `generate`, so each prompt's output
depends on its own logits and seed, not on the batch it rode in."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria


class RowSampler(LogitsProcessor):
    """Samples one token per row with its own generator (temperature, top-p), then leaves
    only that token finite so greedy search picks it. Greedy rows are left untouched."""

    def __init__(self, *, temperature: float, top_p: float, seeds: list[int]) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generators = []
        for seed in seeds:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.generators.append(gen)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.pick(scores, list(range(scores.shape[0])))
        forced = torch.full_like(scores, float("-inf"))
        rows = torch.arange(scores.shape[0], device=scores.device)
        forced[rows, torch.tensor(chosen, device=scores.device)] = 0.0
        return forced

    def pick(self, scores: torch.Tensor, rows: list[int]) -> list[int]:
        """One sampled token per line of `scores`, line k drawn with row `rows[k]`'s generator."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
            cumulative = sorted_probs.cumsum(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = (cumulative - sorted_probs) >= self.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return [int(torch.multinomial(probs[k], 1, generator=self.generators[r])) for k, r in enumerate(rows)]


_BIT_OF_WORD = torch.arange(32, dtype=torch.int32)


class Permitted:
    """The words each of some positions may take, packed as xgrammar packs its masks: bit k of the
    int32 word i in a position's row is word 32 i + k (`bits`, positions x words, on the CPU).
    Counting a position's words and testing one word read the packed row (a 262,144-word
    vocabulary is 8,192 words a position); only the positions that need every word's flag are
    unpacked to bool (`dense`)."""

    def __init__(self, bits: torch.Tensor, vocab_size: int) -> None:
        if bits.dtype != torch.int32 or bits.dim() != 2 or bits.shape[1] * 32 < vocab_size:
            raise ValueError(f"expected int32 (positions, >= {-(-vocab_size // 32)}) bits, got {bits.dtype} {tuple(bits.shape)}")
        self.bits = bits
        self.vocab_size = vocab_size

    @classmethod
    def of(cls, allowed: torch.Tensor) -> Permitted:
        """From a bool (positions, vocabulary) mask."""
        packed = np.packbits(allowed.cpu().numpy(), axis=1, bitorder="little")  # byte i bit k: word 8 i + k
        packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 4)))
        return cls(torch.from_numpy(packed.view("<i4")), allowed.shape[1])

    def __len__(self) -> int:
        return self.bits.shape[0]

    def counts(self) -> list[int]:
        """How many words each position permits."""
        return np.bitwise_count(self.bits.numpy().view(np.uint32)).sum(axis=1, dtype=np.int64).tolist()

    def has(self, position: int, word: int) -> bool:
        return bool((int(self.bits[position, word >> 5]) >> (word & 31)) & 1)

    def words(self, position: int) -> torch.Tensor:
        """The ids a position permits, ascending (int64)."""
        row = self.bits[position]
        at = row.nonzero().flatten()
        flags = (row[at][:, None] >> _BIT_OF_WORD) & 1 == 1
        return (at[:, None] * 32 + _BIT_OF_WORD)[flags]

    def dense(self, positions: list[int] | None = None) -> torch.Tensor:
        """Bool (positions, vocabulary): these positions' flags, every position's by default."""
        bits = self.bits if positions is None else self.bits[positions]
        flags = np.unpackbits(bits.numpy().view(np.uint8), axis=1, count=self.vocab_size, bitorder="little")
        return torch.from_numpy(flags).bool()


class AllowedChooser(Protocol):
    """What `GreedyRows` asks for a greedy row's token (worker/decode.py `Decoder`)."""

    def stashed(self) -> torch.Tensor: ...

    def best_allowed(self, hidden: torch.Tensor, allowed: Permitted) -> list[int]: ...


class GreedyRows(LogitsProcessor):
    """Last of a greedy `generate`'s processors while the output layer's forward hands back
    placeholder logits (0 for every word) and keeps the final hidden state (`Decoder.stashing`):
    the processors before it (a grammar) turn the words they forbid to -inf, and this one asks the
    decoder for each row's best permitted word from that hidden state (`Decoder.best_allowed`,
    which scores only what the choice needs), leaving only that word finite for greedy search."""

    def __init__(self, chooser: AllowedChooser) -> None:
        self.chooser = chooser

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.chooser.best_allowed(self.chooser.stashed(), Permitted.of(scores > float("-inf")))
        forced = torch.full_like(scores, float("-inf"))
        rows = torch.arange(scores.shape[0], device=scores.device)
        forced[rows, torch.tensor(chosen, device=scores.device)] = 0.0
        return forced


# Generation settings whose processors read logits' values rather than only masking words, with the
# values that turn them off: `GreedyRows` needs placeholder logits to pass through unchanged but for -inf.
_VALUE_SETTINGS = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
                   "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
                   "sequence_bias": (None,), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
                   "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False)}


def masks_only(config: Any) -> bool:
    """Whether a generation config adds no processor that reads logits' values (only masks)."""
    return all(getattr(config, name, None) in neutral for name, neutral in _VALUE_SETTINGS.items())


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated text contains any stop string."""

    def __init__(self, *, stops: list[str], tokenizer: Any, prompt_width: int) -> None:
        self.stops = stops
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.window = stop_window(stops)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_width:][:, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done = [any(s in text for s in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def stop_window(stops: list[str]) -> int:
    """How many trailing tokens to decode to see a new stop string: every token decodes to at
    least one character, so a stop of n characters lies within the last n + 1 tokens when it
    first appears."""
    return max((len(s) for s in stops), default=0) + 1


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the earliest stop string, and whether one was found."""
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True
