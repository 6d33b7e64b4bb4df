"""The merged decoder (worker/decode.py) on the real model: it must give the tokens `generate` gives,
drop finished rows without disturbing the others, hold rows past the sliding window, and leave
the work it does not take (sampled rows under a grammar) to `generate`."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from tests.conftest import run_cli
from worker.decode import Decoder, Lookup, _SlidingSlotLayer
from worker.engine import Engine, plan_batches

INSTRUCTION = "<start_of_turn>user\nExplain what this documentation describes:\n\n{}<end_of_turn>\n<start_of_turn>model\n"


def _prompts(engine: Engine, docstrings: list[str], n: int, *, longest: int = 300) -> list[tuple[int, ...]]:
    """n real chat prompts of mixed length (a few dozen to `longest` tokens), shuffled."""
    items = engine.tokenize([INSTRUCTION.format(" ".join(d.split())) for d in docstrings[:400]],
                            truncate=True, what="prompt")
    usable = sorted((it.ids for it in items if len(it.ids) <= longest), key=len)
    picks = [usable[int(i * (len(usable) - 1) / (n - 1))] for i in range(n)]
    random.Random(3).shuffle(picks)
    return picks


def _ragged(engine: Engine, docstrings: list[str], *, longest: int, end: Callable[[int], int]
            ) -> tuple[list[tuple[int, ...]], list[int], dict[int, int], Callable[[int, list[int]], bool]]:
    """12 prompts, longest first (`order`), the k-th of them to end after `end(k)` tokens (`ends`,
    enforced by `stop`)."""
    rows = _prompts(engine, docstrings, 12, longest=longest)
    order = sorted(range(12), key=lambda i: len(rows[i]), reverse=True)
    ends = {i: end(k) for k, i in enumerate(order)}

    def stop(row: int, ids: list[int]) -> bool:
        return len(ids) >= ends[row]

    return rows, order, ends, stop


@pytest.fixture
def unoptimised(engine: Engine):
    """Yields a function that runs the engine's `generate` path (one left-padded batch per plan)."""
    def run(fn):
        engine.batched_decode = False
        try:
            return fn()
        finally:
            engine.batched_decode = True
    return run


def test_merged_greedy_decoding_gives_the_tokens_generate_gives(engine: Engine, docstrings: list[str], unoptimised) -> None:
    # Given 12 real prompts from ~30 to ~300 tokens, in shuffled length order
    from worker.engine import Tokenized
    items = [Tokenized(ids=p, truncated=False) for p in _prompts(engine, docstrings, 12)]
    # When generated greedily through the merged decoder and through `generate`
    plan = engine.plan_generate(items, max_new_tokens=24, merged=True)
    merged = engine.generate_tokenized(items, max_new_tokens=24)
    reference = unoptimised(lambda: engine.generate_tokenized(items, max_new_tokens=24))
    # Then every row went through the merged decoder, prefilled in more than one group,
    assert all(is_merged for _, is_merged in plan) and len(plan) == 1
    assert len(plan_batches([len(it.ids) for it in items], token_budget=engine.token_budget,
                            max_batch_size=engine.max_batch_size)) > 1
    # and every output is the same, token for token, with the same finish reason
    for m, r in zip(merged, reference):
        assert m.token_ids == r.token_ids
        assert m.finish_reason == r.finish_reason and m.text == r.text


def test_rows_that_finish_leave_the_batch_without_changing_the_others(engine: Engine, docstrings: list[str]) -> None:
    # Given 8 prompts decoded once to the end, and once with half of them declared finished after
    # 3 tokens (so the batch shrinks below the compaction threshold and the cache is re-indexed)
    rows = _prompts(engine, docstrings, 8, longest=200)
    decoder: Decoder = engine.decoder
    groups = plan_batches([len(r) for r in rows], token_budget=engine.token_budget, max_batch_size=64)

    def greedy(logits: torch.Tensor, live: list[int]) -> list[int]:
        assert logits.shape[0] == len(live)
        return logits.argmax(dim=-1).tolist()

    seen_batch: list[int] = []

    def tracking(logits: torch.Tensor, live: list[int]) -> list[int]:
        seen_batch.append(len(live))
        return greedy(logits, live)

    with torch.inference_mode():
        full = decoder.run(rows, groups, max_new_tokens=16, choose=greedy, finished=lambda r, ids: False)
        cut = decoder.run(rows, groups, max_new_tokens=16, choose=tracking,
                          finished=lambda r, ids: r % 2 == 0 and len(ids) == 3)
    # Then the finished rows stopped at 3 tokens, which are the first 3 of their full run,
    assert all(cut[r] == full[r][:3] for r in range(0, 8, 2))
    # the others are unchanged by their neighbours leaving,
    assert all(cut[r] == full[r] for r in range(1, 8, 2))
    # and only the 4 live rows were decoded after the cut
    assert seen_batch[:3] == [8, 8, 8] and set(seen_batch[3:]) == {4}


def test_waiting_prompts_join_the_running_batch_as_rows_finish(engine: Engine, docstrings: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Given 12 prompts, each to end after its own number of tokens (2 to 10, at most 10), and a
    # key/value budget that holds four rows of the longest prompt at a time
    rows, order, ends, stop = _ragged(engine, docstrings, longest=120, end=lambda k: 2 + (k * 5) % 9)
    decoder: Decoder = engine.decoder

    live_sets: list[list[int]] = []

    def greedy(logits: torch.Tensor, live: list[int]) -> list[int]:
        return logits.argmax(dim=-1).tolist()

    def tracking(logits: torch.Tensor, live: list[int]) -> list[int]:
        live_sets.append(list(live))
        return greedy(logits, live)

    shifts: list[int] = []
    rebuild = decoder._rebuild

    def recording(*args, **kwargs):
        shifts.append(kwargs["shift"])
        return rebuild(*args, **kwargs)

    monkeypatch.setattr(decoder, "_rebuild", recording)
    slots = 4 * (len(rows[order[0]]) + 2 * 10)
    with torch.inference_mode():
        alone = {i: decoder.run(rows, [[i]], max_new_tokens=10, choose=greedy, finished=stop)[i] for i in range(12)}
        shifts.clear()
        # When they are decoded together, one prefill group per prompt, longest first
        together = decoder.run(rows, [[i] for i in order], max_new_tokens=10, choose=tracking, finished=stop,
                               slots=slots, max_rows=64)
    # Then every row has exactly the tokens it has decoded alone, ending where it was told to
    assert together == alone and all(len(together[i]) == ends[i] for i in range(12))
    # never more than four rows decoded at once,
    assert max(len(live) for live in live_sets) <= 4
    # rows that waited decoded in the same steps as rows of the first four (they joined a running
    # batch rather than waiting for it to end), and the batch moved its columns left to let them in
    first_four = set(order[:4])
    assert any(set(live) & first_four and set(live) - first_four for live in live_sets)
    assert any(shift > 0 for shift in shifts)


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence_of_the_tail() -> None:
    # Given a row whose tokens repeat: 5 6 7 8 ... 5 6 7 9 ... 6 7
    lookup = Lookup([5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 6, 7])
    # Then the tail "6 7" (no earlier "2 6 7") drafts what followed its latest earlier occurrence
    assert lookup.propose(3) == [9, 2, 6]
    # and a new token extends the tail: "6 7 9" occurred once, so its continuation is drafted,
    lookup.append(9)
    assert lookup.propose(2) == [2, 6]
    # shorter tails stand in for longer ones, a draft stops at the end of what is known,
    lookup.append(4)
    assert lookup.propose(5) == []  # 4 never occurred before
    lookup.append(2)
    assert lookup.propose(4) == [6, 7, 9, 4]  # "2" last occurred before "6 7 9 4 2"
    # and nothing is drafted when asked for nothing, or from a lone token
    assert lookup.propose(0) == [] and Lookup([3]).propose(2) == []


def test_drafted_greedy_decoding_keeps_the_tokens_of_one_token_steps(engine: Engine, docstrings: list[str]) -> None:
    # Given 12 prompts, each to end after its own number of tokens (6 to 30), and a key/value budget
    # of four rows at a time (rows finish at different steps, waiting prompts join a running batch)
    rows, order, ends, stop = _ragged(engine, docstrings, longest=160, end=lambda k: 6 + (k * 7) % 25)
    decoder: Decoder = engine.decoder

    slots = 4 * (len(rows[order[0]]) + 2 * 30 + decoder.draft_tokens)
    runs = {}
    kept = decoder.draft_tokens
    try:
        for count in (kept, 0):
            decoder.draft_tokens = count
            before = (decoder.drafted, decoder.accepted, decoder.steps)
            with torch.inference_mode():
                out = decoder.run(rows, [[i] for i in order], max_new_tokens=30, choose=None, finished=stop,
                                  slots=slots, max_rows=64)
            runs[count] = (out, decoder.drafted - before[0], decoder.accepted - before[1], decoder.steps - before[2])
    finally:
        decoder.draft_tokens = kept
    (drafted_out, drafted, accepted, steps), (plain_out, none, _, plain_steps) = runs[kept], runs[0]
    # When greedy rows draft by prompt lookup, every row has the tokens of one-token steps, ending where told,
    assert kept > 0 and drafted_out == plain_out and all(len(drafted_out[i]) == ends[i] for i in range(12))
    # the model kept some drafts (these answers restate their prompts), so it took fewer steps
    assert none == 0 and 0 < accepted <= drafted
    assert steps < plain_steps


def test_the_cli_drafts_unless_told_not_to() -> None:
    # Given a prompt whose answer restates it, generated greedily through the CLI with and without drafts
    prompt = "Repeat this line exactly: the quick brown fox jumps over the lazy dog, the quick brown fox"
    args = ("generate", prompt, "--max-tokens", "16", "--device", "cpu", "--log-level", "INFO")
    on, off = run_cli(*args), run_cli(*args, "--no-drafts")
    assert on.returncode == 0 and off.returncode == 0, (on.stderr, off.stderr)
    # Then the first decodes with drafts, the second one token a step, and both print the same text
    assert "greedy rows: up to 3 prompt-lookup drafts a step" in on.stderr
    assert "greedy rows: one token a step, no drafts" in off.stderr
    assert on.stdout == off.stdout and on.stdout.strip()


def test_refilled_decoding_gives_generates_text_with_real_stop_strings(engine: Engine, docstrings: list[str],
                                                                      unoptimised) -> None:
    from worker.engine import Tokenized
    # Given 12 real prompts whose answers end at a stop string at different points, and a key/value
    # budget of four rows at a time (so most prompts wait and join as others stop)
    items = [Tokenized(ids=p, truncated=False) for p in _prompts(engine, docstrings, 12, longest=160)]
    old = engine.decode_tokens
    engine.decode_tokens = 4 * (max(len(it.ids) for it in items) + 2 * 16)
    try:
        merged = engine.generate_tokenized(items, max_new_tokens=16, stop=["."])
    finally:
        engine.decode_tokens = old
    reference = unoptimised(lambda: engine.generate_tokenized(items, max_new_tokens=16, stop=["."]))
    # Then every text and finish reason is the one `generate` gives, and both kinds of ending occurred
    assert [g.text for g in merged] == [g.text for g in reference]
    assert [g.finish_reason for g in merged] == [g.finish_reason for g in reference]
    assert {g.finish_reason for g in merged} == {"stop", "length"}


def test_stop_strings_and_seeded_sampling_hold_in_the_merged_decoder(engine: Engine, unoptimised) -> None:
    prompts = ["Count: 1, 2, 3, 4,", "The alphabet: a, b, c, d,", "Water boils at"]
    # Stop strings cut the text where `generate` cuts it
    merged = engine.generate(prompts, max_new_tokens=20, stop=[","])
    reference = unoptimised(lambda: engine.generate(prompts, max_new_tokens=20, stop=[","]))
    assert [g.text for g in merged] == [g.text for g in reference]
    assert [g.finish_reason for g in merged] == [g.finish_reason for g in reference]
    assert all("," not in g.text for g in merged)
    # A seeded prompt samples the same text alone and among other prompts
    alone = engine.generate(prompts[:1], max_new_tokens=16, temperature=0.9, seed=11)[0]
    among = engine.generate(prompts, max_new_tokens=16, temperature=0.9, seed=11)[0]
    assert alone.token_ids == among.token_ids


def test_work_the_merged_decoder_cannot_hold_goes_through_generate(engine: Engine, docstrings: list[str]) -> None:
    from worker.engine import Tokenized
    window = engine.decoder.config.sliding_window
    long_text = " ".join(docstrings[:60])
    long_ids = engine.tokenize([long_text], truncate=True, limit=window + 50, what="prompt")[0]
    short = engine.tokenize(["Water boils at"], truncate=False, what="prompt")[0]
    # A prompt past the sliding window is planned for the merged decoder with the others
    assert len(long_ids.ids) > window
    plan = engine.plan_generate([long_ids, short], max_new_tokens=8, merged=True)
    assert plan == [([0, 1], True)]
    # Constrained greedy rows go through the merged decoder too, constrained sampled rows through `generate`
    assert engine.merges(constrained=True, temperature=0.0) and engine.merges(constrained=False, temperature=0.7)
    assert not engine.merges(constrained=True, temperature=0.7)
    assert all(not m for _, m in engine.plan_generate([short], max_new_tokens=8, merged=False))
    # Merged rows go to the decoder in one batch (it keeps as many decoding as the key/value
    # budget holds and refills the rest as rows finish: the refill tests below)
    many = [short] * 10
    old = engine.decode_tokens, engine.generate_tokens
    try:
        engine.decode_tokens = 4 * (len(short.ids) + 8)
        assert [len(b) for b, _ in engine.plan_generate(many, max_new_tokens=8, merged=True)] == [10]
        # `generate` batches by their own key/value budget, not the merged
        # decoder's or the forward budget
        engine.generate_tokens = 4 * (len(short.ids) + 8)
        engine.decode_tokens = 100 * (len(short.ids) + 8)
        assert [len(b) for b, _ in engine.plan_generate(many, max_new_tokens=8, merged=False)] == [4, 4, 2]
        engine.generate_tokens = 10 * (len(short.ids) + 8)
        engine.decode_tokens = 2 * (len(short.ids) + 8)
        assert [len(b) for b, _ in engine.plan_generate(many, max_new_tokens=8, merged=False)] == [10]
    finally:
        engine.decode_tokens, engine.generate_tokens = old
    # Prompts of very different lengths share one `generate` batch where the budget holds them:
    # padding a prompt costs less than taking its row through every decode step of a batch of its own
    mixed = [Tokenized(ids=tuple(range(1000, 1000 + n)), truncated=False) for n in (20, 300, 25, 310, 40)]
    assert [sorted(b) for b, _ in engine.plan_generate(mixed, max_new_tokens=64, merged=False)] == [[0, 1, 2, 3, 4]]
    # (an embedding forward pass, with no decode steps, would split them by length)
    assert len(plan_batches([len(t.ids) + 64 for t in mixed], token_budget=engine.generate_tokens,
                            max_batch_size=engine.max_batch_size)) == 2
    # and a call answers in input order
    out = engine.generate_tokenized([long_ids, short], max_new_tokens=8)
    assert out[1].token_ids == engine.generate_tokenized([short], max_new_tokens=8)[0].token_ids
    assert out[0].prompt_tokens == len(long_ids.ids)


def _handed_columns(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records, for every update of a sliding layer's slots, (columns handed to attention, columns held)."""
    seen: list[tuple[int, int]] = []
    update = _SlidingSlotLayer.update

    def recording(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        seen.append((keys.shape[2], self.length))
        return keys, values

    monkeypatch.setattr(_SlidingSlotLayer, "update", recording)
    return seen


def test_rows_past_the_sliding_window_give_the_tokens_generate_gives(engine: Engine, docstrings: list[str],
                                                                    unoptimised, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given prompts on both sides of the 512-token sliding window: two past it (the prefill's
    # sliding layers keep only the window's last columns), one whose decode crosses it, and shorter ones
    from worker.engine import Tokenized
    window = engine.decoder.config.sliding_window
    long_text = INSTRUCTION.format(" ".join(" ".join(d.split()) for d in docstrings[:80]))
    items = [engine.tokenize([long_text], truncate=True, limit=n, what="prompt")[0]
             for n in (window + 300, window + 40, window - 20)]
    items += [Tokenized(ids=p, truncated=False) for p in _prompts(engine, docstrings, 4)]
    assert len(items[0].ids) > window + 200 and window - 48 < len(items[2].ids) < window
    seen = _handed_columns(monkeypatch)
    # When generated greedily, 48 new tokens each, through the merged decoder (drafts on) and `generate`
    plan = engine.plan_generate(items, max_new_tokens=48, merged=True)
    merged = engine.generate_tokenized(items, max_new_tokens=48)
    reference = unoptimised(lambda: engine.generate_tokenized(items, max_new_tokens=48))
    # Then every row went through the merged decoder and has `generate`'s tokens and finish
    assert plan == [(sorted(range(len(items)), key=lambda i: len(items[i].ids), reverse=True), True)]
    for m, r in zip(merged, reference):
        assert (m.token_ids, m.finish_reason) == (r.token_ids, r.finish_reason)
    assert sum(len(m.token_ids) for m in merged) > 4 * 48
    # and its sliding layers were handed about a window of columns, not every column the rows hold
    merged_steps = [(handed, held) for handed, held in seen if held > window + 200]
    assert merged_steps and max(handed for handed, _ in merged_steps) < window + 48 + 16


def test_rows_past_the_window_join_and_leave_a_running_batch_with_their_own_tokens(
        engine: Engine, docstrings: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given 6 prompts, two past the sliding window and the rest long enough to cross it, each to end
    # after its own number of tokens, and a key/value budget of three rows of the longest
    decoder: Decoder = engine.decoder
    window = decoder.config.sliding_window
    long_text = INSTRUCTION.format(" ".join(" ".join(d.split()) for d in docstrings[100:180]))
    rows = [engine.tokenize([long_text], truncate=True, limit=n, what="prompt")[0].ids
            for n in (window + 150, window + 20, window - 10, window - 30, window - 60, window - 90)]
    ends = {i: 12 + 9 * ((i * 5) % 6) for i in range(6)}

    def stop(row: int, ids: list[int]) -> bool:
        return len(ids) >= ends[row]

    live: list[int] = []
    step = decoder._step

    def counting(cache, feeds, *args, **kwargs):
        live.append(len(feeds))
        return step(cache, feeds, *args, **kwargs)

    monkeypatch.setattr(decoder, "_step", counting)
    with torch.inference_mode():
        # When each is decoded alone, greedily with drafts, and then all together, one prefill group each
        alone = {i: decoder.run(rows, [[i]], max_new_tokens=60, choose=None, finished=stop)[i] for i in range(6)}
        live.clear()
        together = decoder.run(rows, [[i] for i in range(6)], max_new_tokens=60, choose=None, finished=stop,
                               slots=3 * (len(rows[0]) + 2 * 60 + decoder.draft_tokens), max_rows=64)
    # Then every row has the tokens it has alone, ending where it was told to, never more than
    # three rows decoding at once and rows joining the running batch
    assert together == alone and all(len(together[i]) == ends[i] for i in range(6))
    assert max(live) == 3 and live.count(3) > live.index(3) + 1 and len(set(live)) > 1


def test_the_blocked_greedy_head_picks_what_argmax_over_full_logits_picks(engine: Engine, docstrings: list[str]) -> None:
    # Given the final hidden states of 24 real prompts, and rows built to tie across vocabulary blocks
    decoder: Decoder = engine.decoder
    rows = _prompts(engine, docstrings, 24, longest=120)
    with torch.inference_mode():
        hidden = torch.cat([decoder.prefill(rows, [i]).hidden for i in range(len(rows))])
        # When the greedy token is taken blockwise and from the full logits
        full = decoder.logits(hidden)
        # Then they agree on every row, in blocks of 4,096 words (CPU) or as one block (a GPU's choice)
        assert decoder.vocab_block == 4096
        assert decoder.best_blocked(hidden) == full.argmax(dim=-1).tolist()
        try:
            decoder.vocab_block = decoder.config.vocab_size
            assert decoder.best_blocked(hidden) == full.argmax(dim=-1).tolist()
        finally:
            decoder.vocab_block = 4096
        # and on a tie between two tokens in different blocks the lower id wins, as with argmax
        weight = decoder.head.weight
        a, b = 5, 4096 * 3 + 7
        probe = (weight[a] / weight[a].norm() ** 2).unsqueeze(0)
        saved = weight[b].clone()
        try:
            weight[b] = weight[a]
            assert decoder.best_blocked(probe) == decoder.logits(probe).argmax(dim=-1).tolist() == [a]
        finally:
            weight[b] = saved


def test_merging_moves_each_prefill_cache_into_the_merged_one_and_frees_it(engine: Engine, docstrings: list[str]) -> None:
    # Given two prefill groups of real prompts
    decoder: Decoder = engine.decoder
    rows = _prompts(engine, docstrings, 6, longest=120)
    with torch.inference_mode():
        groups = [decoder.prefill(rows, [0, 1, 2]), decoder.prefill(rows, [3, 4, 5])]
        expected = [(g.width, layer.keys.clone(), layer.values.clone()) for g in groups for layer in g.cache.layers[:2]]
        width = max(g.width for g in groups)
        # When they are merged into one cache with room for 8 new tokens
        merged = decoder.merge(groups, width=width, total=width + 8)
    # Then each group's keys and values sit right-aligned at the widest width, in group order
    for index in range(2):
        first_w, first_k, first_v = expected[index]
        second_w, second_k, second_v = expected[2 + index]
        layer = merged.layers[index]
        assert torch.equal(layer.keys[:3, :, width - first_w: width], first_k)
        assert torch.equal(layer.values[3:, :, width - second_w: width], second_v)
    # And the groups' own caches were released as they were copied (not held beside the merged one)
    assert all(layer.keys.numel() == 0 and layer.values.numel() == 0 for g in groups for layer in g.cache.layers)


def test_merging_prefills_as_it_goes_holds_one_prefill_cache_beside_the_merged_one(engine: Engine,
                                                                                    docstrings: list[str]) -> None:
    # Given three prefill groups of real prompts, prefilled only as the merge asks for the next
    decoder: Decoder = engine.decoder
    rows = _prompts(engine, docstrings, 6, longest=120)
    made: list = []
    live_before_each: list[int] = []

    def prefills():
        for group in ([0, 1], [2, 3], [4, 5]):
            # how many earlier groups still hold keys when this one is made
            live_before_each.append(sum(1 for g in made if g.cache.layers[0].keys.numel()))
            made.append(decoder.prefill(rows, group))
            yield made[-1]

    width = max(len(r) for r in rows)
    with torch.inference_mode():
        # When they are merged into a cache sized for eight rows (two more than they have)
        merged = decoder.merge(prefills(), width=width, total=width + 8, rows=8)
    # Then no group was prefilled while an earlier one still held its cache,
    assert live_before_each == [0, 0, 0]
    # and the merged cache exposes the six rows it holds, in a buffer of eight
    layer = merged.layers[0]
    assert layer.keys.shape[0] == 6 and layer.keys_buf.shape[0] == 8
    assert layer.keys.shape[2] == width and layer.keys_buf.shape[2] == width + 8


def test_rows_leaving_and_joining_rewrite_the_cache_in_place_as_a_new_one_would_hold_it(
        engine: Engine, docstrings: list[str]) -> None:
    # Given a merged cache of four real prompts in a buffer of six rows, whose columns past the
    # prompts hold what decode steps wrote (random here), and a fifth prompt prefilled to join
    decoder: Decoder = engine.decoder
    rows = _prompts(engine, docstrings, 5, longest=120)
    width = max(len(r) for r in rows[:4])
    total = width + 16
    with torch.inference_mode():
        merged = decoder.merge([decoder.prefill(rows, [0, 1]), decoder.prefill(rows, [2, 3])],
                               width=width, total=total, rows=6)
        generator = torch.Generator().manual_seed(0)
        for layer in merged.layers:
            for buf in (layer.keys_buf, layer.values_buf):
                buf[:4, :, width:width + 6] = torch.randn(buf[:4, :, width:width + 6].shape, generator=generator)
            layer.length = width + 6
            layer._expose()
        before = [(layer.keys_buf.clone(), layer.values_buf.clone()) for layer in merged.layers]
        pointers = [(layer.keys_buf.data_ptr(), layer.values_buf.data_ptr()) for layer in merged.layers]
        joining = decoder.prefill(rows, [4])
        joined = [(layer.keys.clone(), layer.values.clone()) for layer in joining.cache.layers]
        mask = torch.zeros((4, total), dtype=torch.bool)
        mask[:, : width + 6] = True
        keep = torch.tensor([3, 1])  # rows 0 and 2 finished; the kept ones change places
        shift, column = 2, width + 6
        # When the batch is rebuilt: rows 3 and 1 kept, every column moved two left, the fifth joining
        new_mask = decoder._rebuild(merged, mask, keep, shift=shift, column=column, total=total,
                                    joining=[(joining, [0])])
    end = column - shift
    for layer, (keys, values), (ptr_k, ptr_v), (join_k, join_v) in zip(merged.layers, before, pointers, joined):
        # Then the same buffers hold the new batch (nothing the size of the cache allocated),
        assert (layer.keys_buf.data_ptr(), layer.values_buf.data_ptr()) == (ptr_k, ptr_v)
        for buf, old, join in ((layer.keys_buf, keys, join_k), (layer.values_buf, values, join_v)):
            expected = torch.zeros((3, *old.shape[1:]), dtype=old.dtype)
            expected[:2, :, :end] = old[[3, 1], :, shift:column]
            expected[2:, :, end - joining.width: end] = join
            # every row as a freshly built cache would hold it: moved, zero past the current column,
            # the newcomer's prompt ending there and zeros around it
            assert torch.equal(buf[:3], expected)
        # exposing the three live rows up to the current column
        assert layer.keys.shape[0] == 3 and layer.length == end
    assert new_mask.shape == (3, total) and new_mask[:2, :end].all() and not new_mask[:2, end:].any()
    assert new_mask[2, end - joining.width: end].all() and not new_mask[2, : end - joining.width].any()
