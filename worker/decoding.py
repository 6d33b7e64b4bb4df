"""Per-row sampling and stop strings for batched `generate`, so each prompt's output
depends on its own logits and seed, not on the batch it rode in."""
from __future__ import annotations

from typing import Any

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
