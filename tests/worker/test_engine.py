"""The engine on the real Gemma 3 270M: batching must not change answers, order must hold,
limits and bad arguments must give clear errors."""
from __future__ import annotations

import random

import numpy as np
import pytest

from schemas.errors import ErrorCode, TaskError
from worker.engine import Engine, plan_batches

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a fox who",
    "1, 2, 3, 4,",
    "Water boils at",
    "The three primary colours are",
    "Here is a haiku about the sea:\n",
    "Q: What is the largest planet in the solar system?\nA:",
]


def _mixed_lengths(docstrings: list[str], n: int, seed: int = 7) -> list[str]:
    """n real texts spread from a few words to a few hundred tokens, in shuffled length order."""
    by_len = sorted(docstrings, key=len)
    picks = [by_len[int(i * (len(by_len) - 1) / (n - 1))] for i in range(n)]
    random.Random(seed).shuffle(picks)
    return picks


def test_batched_embedding_equals_single(engine: Engine, docstrings: list[str]) -> None:
    # Given 32 real texts of mixed length
    texts = _mixed_lengths(docstrings, 32)
    # When embedded as one call and then one at a time
    batched = engine.embed(texts).vectors
    singles = np.stack([engine.embed([t]).vectors[0] for t in texts])
    # Then every text's vector is the same (cosine >= 0.9999), and the call really batched
    cosines = np.sum(batched * singles, axis=1)
    assert cosines.min() >= 0.9999, cosines
    costs = [len(t.ids) for t in engine.tokenize(texts, truncate=False)]
    plan = plan_batches(costs, token_budget=engine.token_budget, max_batch_size=engine.max_batch_size)
    assert max(len(b) for b in plan) > 1


def test_batched_greedy_generation_equals_single(engine: Engine) -> None:
    # Given 8 prompts of different lengths
    # When generated greedily as one batch and then one at a time
    batched = engine.generate(PROMPTS, max_new_tokens=16)
    singles = [engine.generate([p], max_new_tokens=16)[0] for p in PROMPTS]
    # Then each prompt gets exactly the same tokens
    for prompt, b, s in zip(PROMPTS, batched, singles):
        assert b.token_ids == s.token_ids, prompt
        assert b.text == s.text and len(b.token_ids) > 0


def test_order_is_restored_for_shuffled_lengths(engine: Engine, docstrings: list[str]) -> None:
    # Given texts whose lengths are not sorted, and the same texts reversed
    texts = _mixed_lengths(docstrings, 12, seed=3)
    lengths = [len(t) for t in texts]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)
    # When both orders are embedded
    forward = engine.embed(texts).vectors
    backward = engine.embed(texts[::-1]).vectors[::-1]
    # Then row i belongs to text i in both, and distinct texts have distinct vectors
    assert np.sum(forward * backward, axis=1).min() >= 0.9999
    assert np.abs(forward[0] - forward[1]).max() > 1e-3
    # And generation keeps prompt order too: each output continues its own prompt
    shuffled = PROMPTS[::-1]
    outs = engine.generate(shuffled, max_new_tokens=8)
    for prompt, out in zip(shuffled, outs):
        assert out.prompt_tokens == len(engine.tokenize([prompt], truncate=False)[0].ids)


def test_over_long_input_is_refused_or_truncated_by_request(engine: Engine, docstrings: list[str]) -> None:
    # Given an engine whose input limit is 64 tokens and a text longer than that
    small = Engine(engine.model, max_input_tokens=64, token_budget=engine.token_budget,
                   max_batch_size=engine.max_batch_size, max_new_tokens=engine.max_new_tokens)
    long_text = max(docstrings, key=len)
    # When embedded with truncate=False / Then a clear error names the limit
    with pytest.raises(TaskError) as caught:
        small.embed(["short text", long_text], truncate=False)
    assert caught.value.code == ErrorCode.INPUT_TOO_LONG
    assert "max_input_tokens=64" in caught.value.message and "text 1 " in caught.value.message
    # When embedded with truncate=True / Then it embeds and reports which one it cut
    out = small.embed(["short text", long_text], truncate=True)
    assert out.truncated == [False, True]
    assert out.input_tokens[1] == 64 and out.vectors.shape == (2, engine.width)
    # And a generation prompt over the limit is refused the same way
    with pytest.raises(TaskError) as caught:
        small.generate([long_text], max_new_tokens=4)
    assert caught.value.code == ErrorCode.INPUT_TOO_LONG


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        (lambda e: e.embed(["a"], dims=0), ErrorCode.INVALID_PARAMETER, "dims"),
        (lambda e: e.embed(["a"], dims=e.width + 1), ErrorCode.INVALID_PARAMETER, "640"),
        (lambda e: e.embed([]), ErrorCode.EMPTY_INPUT, "at least one"),
        (lambda e: e.embed(["ok", ""]), ErrorCode.EMPTY_INPUT, "text 1 is empty"),
        (lambda e: e.embed("not a list"), ErrorCode.INVALID_FIELD, "list"),
        (lambda e: e.generate(["a"], max_new_tokens=-1), ErrorCode.MAX_TOKENS_OUT_OF_RANGE, "max_new_tokens"),
        (lambda e: e.generate(["a"], max_new_tokens=10**6), ErrorCode.MAX_TOKENS_OUT_OF_RANGE, "max_new_tokens=1024"),
        (lambda e: e.generate(["a"], temperature=-0.1), ErrorCode.INVALID_PARAMETER, "temperature"),
        (lambda e: e.generate(["a"], temperature=float("nan")), ErrorCode.INVALID_PARAMETER, "temperature"),
        (lambda e: e.generate(["a"], temperature=1e-45), ErrorCode.INVALID_PARAMETER, "0 (greedy) or at least 1e-06"),
        (lambda e: e.generate(["a"], top_p=0), ErrorCode.INVALID_PARAMETER, "top_p"),
        (lambda e: e.generate([]), ErrorCode.EMPTY_INPUT, "at least one"),
        (lambda e: e.generate([" "]), ErrorCode.EMPTY_INPUT, "prompt 0 is empty"),
    ],
)
def test_bad_arguments_give_clear_errors(engine: Engine, call, code: ErrorCode, words: str) -> None:
    # Given a bad argument / When the engine is called / Then a TaskError with a readable message
    with pytest.raises(TaskError) as caught:
        call(engine)
    assert caught.value.code == code
    assert words in caught.value.message


def test_matryoshka_dims_truncate_and_renormalise(engine: Engine) -> None:
    # Given two texts / When embedded at full width and at 128 dims
    full = engine.embed(["graph databases", "knowledge graphs"]).vectors
    small = engine.embed(["graph databases", "knowledge graphs"], dims=128).vectors
    # Then the small vectors are the full vectors' prefix, re-normalised to unit length
    assert small.shape == (2, 128)
    assert np.allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    prefix = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert np.allclose(small, prefix, atol=1e-5)


def test_stop_strings_end_generation_early(engine: Engine) -> None:
    # Given a counting prompt and the stop string "8"
    out = engine.generate(["1, 2, 3, 4,"], max_new_tokens=40, stop=["8"])[0]
    # Then the text ends before the stop string, well before the token limit
    assert "8" not in out.text and "7" in out.text
    assert out.finish_reason == "stop" and len(out.token_ids) < 40


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: Engine) -> None:
    # Given a sampled request with a seed / When run alone and beside another prompt
    alone = engine.generate(["Once upon a time"], max_new_tokens=16, temperature=0.9, seed=11)[0]
    beside = engine.generate(["Once upon a time", "The weather today"], max_new_tokens=16, temperature=0.9, seed=11)[0]
    other_seed = engine.generate(["Once upon a time"], max_new_tokens=16, temperature=0.9, seed=12)[0]
    # Then the same seed gives the same text, and another seed another text
    assert alone.token_ids == beside.token_ids
    assert other_seed.token_ids != alone.token_ids


def test_plan_batches_respects_budget_and_covers_every_item() -> None:
    # Given random costs / When planned
    rng = random.Random(1)
    costs = [rng.randint(1, 500) for _ in range(300)]
    plan = plan_batches(costs, token_budget=2048, max_batch_size=16)
    # Then every item appears once, no batch exceeds the budget or size, and batches are length-sorted
    assert sorted(i for b in plan for i in b) == list(range(300))
    for batch in plan:
        assert len(batch) <= 16 and max(costs[i] for i in batch) * len(batch) <= 2048
        assert [costs[i] for i in batch] == sorted((costs[i] for i in batch), reverse=True)
    # And an item over the budget still gets a batch of its own
    assert plan_batches([5000, 10], token_budget=2048, max_batch_size=8) == [[0], [1]]


def _cheapest(costs: list[int], *, budget: int, size: int, overhead: int) -> int:
    """Brute force: the cheapest split of the length-sorted costs into runs (padded + overhead each)."""
    ordered = sorted(costs, reverse=True)
    best = None
    for mask in range(1 << (len(ordered) - 1)):
        total, start = 0, 0
        for end in range(1, len(ordered) + 1):
            if end == len(ordered) or mask >> (end - 1) & 1:
                run = ordered[start:end]
                if len(run) > size or (len(run) > 1 and run[0] * len(run) > budget):
                    total = None
                    break
                total += run[0] * len(run) + overhead
                start = end
        if total is not None and (best is None or total < best):
            best = total
    return best


def test_plan_batches_finds_the_cheapest_split() -> None:
    # Given small random sets of lengths / When planned with a per-batch overhead
    rng = random.Random(7)
    for trial in range(60):
        costs = [rng.randint(1, 300) for _ in range(rng.randint(1, 9))]
        overhead = rng.choice([0, 16, 64])
        plan = plan_batches(costs, token_budget=600, max_batch_size=4, batch_overhead=overhead)
        cost = sum(max(costs[i] for i in b) * len(b) + overhead for b in plan)
        # Then no split of the sorted order is cheaper (padding plus overhead), and all are covered
        assert cost == _cheapest(costs, budget=600, size=4, overhead=overhead), (costs, overhead, plan)
        assert sorted(i for b in plan for i in b) == list(range(len(costs)))
    # And padding is weighed against the overhead: equal lengths share a batch, and a lone long
    # item is not padded onto short ones unless a batch costs more than the padding
    assert plan_batches([100, 100, 100], token_budget=1000, max_batch_size=8, batch_overhead=1) == [[0, 1, 2]]
    assert len(plan_batches([200, 20, 20, 20], token_budget=1000, max_batch_size=8, batch_overhead=10)) == 2
    assert len(plan_batches([200, 20, 20, 20], token_budget=1000, max_batch_size=8, batch_overhead=600)) == 1