"""The greedy head's screens (worker/model/head_screen.py) on the real model: the tokens they pick
are the full fp32 output layer's, their errors on real hidden states stay inside the margin they
check, rows without a clear winner go to the full layer, each CPU gets the kind it runs fastest, and
a screen is built only where and when it is wanted.

The bf16 screen's own checks run on the layer's first `SLICE` words: bf16 `linear` is about 100
times slower than fp32 on a CPU without bf16 units, and the arithmetic does not depend on the
vocabulary's size."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.head import CountingRows
from tests.conftest import REPO, run_cli
from worker.decode import Decoder
from worker.engine import Engine, Tokenized
from worker.model import head_screen
from worker.model.head_screen import Bf16Screen, HeadScreen, Int8Screen
from worker.model.table import WeightRows

SLICE = 16384
SCREENS = {"int4": HeadScreen, "bf16": Bf16Screen, "int8": Int8Screen}
INSTRUCTION = "<start_of_turn>user\nSummarise this documentation:\n\n{}<end_of_turn>\n<start_of_turn>model\n"


def _items(engine: Engine, docstrings: list[str], n: int) -> list[Tokenized]:
    items = engine.tokenize([INSTRUCTION.format(" ".join(d.split())) for d in docstrings[:n]], truncate=True,
                            what="prompt")
    return [it for it in items if len(it.ids) <= 300]


def _decode_states(decoder: Decoder, rows: list[tuple[int, ...]], steps: int) -> torch.Tensor:
    """Final hidden states of real greedy decoding: each row's prompt, then `steps` tokens it chose."""
    states = []
    original = Decoder.best_blocked

    def keep(self: Decoder, hidden: torch.Tensor) -> list[int]:
        states.append(hidden.clone())
        return original(self, hidden)

    wanted, decoder.screen_wanted = decoder.screen_wanted, False
    Decoder.best_blocked = keep  # type: ignore[method-assign]
    try:
        decoder.run(rows, [list(range(len(rows)))], max_new_tokens=steps, choose=None,
                    finished=lambda row, ids: False)
    finally:
        Decoder.best_blocked = original  # type: ignore[method-assign]
        decoder.screen_wanted = wanted
    return torch.cat(states)


@pytest.fixture(scope="module")
def states(engine: Engine, docstrings: list[str]) -> torch.Tensor:
    rows = [it.ids for it in _items(engine, docstrings, 40)][:16]
    with torch.inference_mode():
        return _decode_states(engine.decoder, rows, steps=12)


def _screened_and_full(engine: Engine, items: list[Tokenized], screen: head_screen.Screen, *,
                       max_new_tokens: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(greedy tokens with `screen` asked for every call, whatever an earlier trial on this shared
    engine kept its own screen for; greedy tokens with every word scored in fp32; rows the screen
    answered), the decoder left as it was."""
    decoder: Decoder = engine.decoder
    saved = decoder._screen, decoder.screen_trial, decoder.screened_rows
    decoder._screen, decoder.screen_trial = screen, None
    try:
        screened = engine.generate_tokenized(items, max_new_tokens=max_new_tokens)
        answered = decoder.screened_rows - saved[2]
        decoder.screen_wanted = False
        full = engine.generate_tokenized(items, max_new_tokens=max_new_tokens)
    finally:
        decoder.screen_wanted = True
        decoder._screen, decoder.screen_trial = saved[:2]
    return [g.token_ids for g in screened], [g.token_ids for g in full], answered


def test_screened_greedy_generation_gives_the_full_layers_tokens(engine: Engine, docstrings: list[str]) -> None:
    # Given 24 real prompts of mixed length
    items = _items(engine, docstrings, 60)[:24]
    decoder: Decoder = engine.decoder
    assert decoder.screen_wanted and decoder.ensure_screen() is not None
    # When generated greedily with the screen this CPU chose asked for every call, and with every
    # word scored in fp32
    screened, full, answered = _screened_and_full(engine, items, decoder.ensure_screen(), max_new_tokens=32)
    # Then the screen answered most rows, and every output is the same, token for token
    assert answered > 24 * 16
    assert screened == full


@pytest.fixture(scope="module")
def int4_screen(engine: Engine) -> HeadScreen:
    return HeadScreen(engine.decoder.head)


@pytest.fixture(scope="module")
def sliced_head(engine: Engine) -> torch.nn.Linear:
    """The output layer's first `SLICE` words, sharing its weights."""
    head = torch.nn.Linear(engine.decoder.head.in_features, SLICE, bias=False)
    head.weight = torch.nn.Parameter(engine.decoder.head.weight[:SLICE], requires_grad=False)
    return head


def test_the_screens_errors_on_real_states_stay_inside_its_margin(int4_screen: HeadScreen, engine: Engine,
                                                                  states: torch.Tensor) -> None:
    # Given real decode states and the int4 screen built from the model's output layer
    screen = int4_screen
    weight = engine.decoder.head.weight
    with torch.inference_mode():
        for chunk in states.split(32):
            # When every word is scored by the screen and in fp32
            errors = (screen.scores(chunk) - chunk @ weight.T).abs()
            norms = torch.linalg.vector_norm(chunk, dim=1, keepdim=True)
            # Then no word's error reaches the margin: SIGMAS units at its own residual, plus rounding
            allowed = head_screen.SIGMAS * norms * screen.units + (chunk @ weight.T).abs() * head_screen.ROUNDING
            assert bool((errors < allowed).all())
            # yet the screen is no copy of the fp32 layer: errors reach a sizeable part of one unit
            assert float((errors / (norms * screen.units)).max()) > 1.0
    # and the unit is what the module says: the largest residual over sqrt(hidden size)
    assert screen.unit == pytest.approx(float(screen.units.max()))
    assert 0 < screen.unit < float(torch.linalg.vector_norm(weight.detach(), dim=1).mean()) / math.sqrt(weight.shape[1])


def test_every_real_state_gets_the_full_layers_token(int4_screen: HeadScreen, engine: Engine,
                                                      states: torch.Tensor) -> None:
    # Given real decode states / When the greedy token is taken through the int4 screen and from all logits
    decoder: Decoder = engine.decoder
    with torch.inference_mode():
        ids, sure = int4_screen.best(states)
        # Then every row the screen is sure of has the full layer's token, and it is sure of most
        full = decoder.logits(states).argmax(dim=-1)
        assert torch.equal(ids[sure], full[sure]) and int(sure.sum()) >= 0.9 * len(states)
        # and the decoder, with whichever screen this CPU chose, answers every row as the full layer
        assert decoder.best(states) == full.tolist()


def test_the_bf16_screens_errors_stay_inside_its_bound(sliced_head: torch.nn.Linear, states: torch.Tensor) -> None:
    # Given real decode states and a bf16 screen over the output layer's first words
    screen = Bf16Screen(sliced_head)
    weight = sliced_head.weight
    assert screen.largest_norm == pytest.approx(float(torch.linalg.vector_norm(weight, dim=1).max()))
    with torch.inference_mode():
        for chunk in states.split(64):
            # When every word is scored by the screen and in fp32
            scores, exact = screen.scores(chunk), chunk @ weight.T
            errors = (scores - exact).abs()
            bound = screen.bound(chunk, scores.abs().max(dim=1).values)
            # Then no word's error reaches the row's bound E (a worst case: it holds for any state)
            assert bool((errors <= bound[:, None]).all())
            # and the screen is not the fp32 layer itself: its scores do move
            assert float(errors.max()) > 0


def test_the_bf16_screen_gives_the_full_layers_token_from_few_candidates(
        sliced_head: torch.nn.Linear, states: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given real decode states and a bf16 screen over the output layer's first words, in blocks
    # smaller than the slice so that candidates come from several blocks
    from worker.model import head_screen as module

    monkeypatch.setattr(module, "BF16_BLOCK", 4096)
    screen = Bf16Screen(sliced_head)
    with torch.inference_mode():
        # When the greedy token of every state is taken through the screen and from all scores
        ids, sure = screen.best(states)
        full = (states @ sliced_head.weight.T).argmax(dim=1)
        # Then it is sure of every row and each has the full layer's token
        assert bool(sure.all()) and torch.equal(ids, full)
        # and the bound leaves few words to re-score in fp32
        scores = screen.scores(states)
        bound = screen.bound(states, scores.abs().max(dim=1).values)
        candidates = (scores >= (scores.max(dim=1).values - 2 * bound)[:, None]).sum(dim=1)
        assert int(candidates.median()) <= 64 and int(candidates.max()) <= module.MAX_CANDIDATES


def test_the_bf16_screen_sends_flat_rows_to_the_full_layer_and_breaks_ties_low(sliced_head: torch.nn.Linear) -> None:
    # Given a bf16 screen over the output layer's first words
    screen = Bf16Screen(sliced_head)
    weight = sliced_head.weight
    with torch.inference_mode():
        # When asked for a row that scores every word the same (zero)
        _, sure = screen.best(torch.zeros(1, weight.shape[1]))
        # Then it is not sure of it (every word is a candidate)
        assert not bool(sure[0])
        # and a row with no finite score is not vouched for either, alone or beside a clear one
        clear = (weight[7] / weight[7].norm() ** 2).unsqueeze(0)
        nan = torch.full_like(clear, float("nan"))
        assert not bool(screen.best(nan)[1][0])
        ids, sure = screen.best(torch.cat([nan, clear]))
        assert sure.tolist() == [False, True] and int(ids[1]) == int((clear @ weight.T).argmax())
        # and when two words tie (the same weights in fp32 and in the screen), the lower id wins
        a, b = 5, 900
        probe = (weight[a] / weight[a].norm() ** 2).unsqueeze(0)
        saved, saved_low = weight[b].clone(), screen.low[b].clone()
        try:
            weight[b], screen.low[b] = weight[a], screen.low[a]
            ids, sure = screen.best(probe)
            assert bool(sure[0]) and int(ids[0]) == a == int((probe @ weight.T).argmax())
        finally:
            weight[b], screen.low[b] = saved, saved_low


@pytest.fixture(scope="module")
def int8_screen(engine: Engine) -> Int8Screen:
    """The int8 screen over the whole output layer, its fp32 rows read from the word table."""
    assert engine.decoder.table is not None
    return Int8Screen(engine.decoder.head, engine.decoder.table)


def test_the_int8_screens_errors_on_real_states_stay_inside_its_margin(int8_screen: Int8Screen, engine: Engine,
                                                                       states: torch.Tensor) -> None:
    # Given real decode states and the int8 screen built from the model's output layer
    screen = int8_screen
    weight = engine.decoder.head.weight
    with torch.inference_mode():
        for chunk in states.split(32):
            # When every word is scored by the screen and in fp32
            errors = (screen.scores(chunk) - chunk @ weight.T).abs()
            unit = screen.bound(chunk, *screen.scaled(chunk)) / head_screen.SIGMAS
            # Then no word's error reaches the margin, SIGMAS units
            assert bool((errors < head_screen.SIGMAS * unit[:, None]).all())
            # yet the screen is no copy of the fp32 layer: errors reach a sizeable part of one unit
            assert float((errors / unit[:, None]).max()) > 1.0
    # and the unit is built from the int8 copy's largest residual and word norm, both measured
    norms = torch.linalg.vector_norm(weight.detach(), dim=1)
    assert 0 < screen.largest_residual < 0.1 * float(norms.mean())
    assert screen.largest_norm == pytest.approx(float(norms.max()), rel=0.01)


def test_the_int8_screens_margin_covers_the_rounding_of_its_input(sliced_head: torch.nn.Linear,
                                                                   states: torch.Tensor) -> None:
    # Given an output layer of the first words whose values int8 holds exactly (each word already
    # int8 codes times one scale), so that the screen's only error is its input's rounding
    _, values = head_screen.int8_pack(sliced_head.weight.detach())
    head = torch.nn.Linear(values.shape[1], values.shape[0], bias=False)
    head.weight = torch.nn.Parameter(values, requires_grad=False)
    screen = Int8Screen(head)
    assert screen.largest_residual == 0.0
    with torch.inference_mode():
        for chunk in states.split(32):
            # When every word is scored by the screen and in fp32
            errors = (screen.scores(chunk) - chunk @ values.T).abs()
            unit = screen.bound(chunk, *screen.scaled(chunk)) / head_screen.SIGMAS
            # Then the errors, from the input's rounding alone, stay inside the margin and fill a
            # sizeable part of one unit
            assert bool((errors < head_screen.SIGMAS * unit[:, None]).all())
            assert float((errors / unit[:, None]).max()) > 1.0


def test_the_int8_screen_gives_every_sure_state_the_full_layers_token(int8_screen: Int8Screen, engine: Engine,
                                                                       states: torch.Tensor) -> None:
    # Given real decode states / When the greedy token is taken through the int8 screen and from all logits
    with torch.inference_mode():
        ids, sure = int8_screen.best(states)
        full = engine.decoder.logits(states).argmax(dim=-1)
    # Then every row it is sure of has the full layer's token, and it is sure of most
    assert torch.equal(ids[sure], full[sure]) and int(sure.sum()) >= 0.9 * len(states)


def test_the_int8_screen_in_the_decoder_gives_the_full_layers_tokens(int8_screen: Int8Screen, engine: Engine,
                                                                      docstrings: list[str]) -> None:
    # Given 12 real prompts
    items = _items(engine, docstrings, 40)[:12]
    # When generated greedily with the int8 screen answering every call, and with every word scored in fp32
    screened, full, answered = _screened_and_full(engine, items, int8_screen, max_new_tokens=24)
    # Then the screen answered most rows, and every output is the same, token for token
    assert answered > 12 * 12
    assert screened == full


@pytest.fixture(scope="module")
def prompt_states(engine: Engine, docstrings: list[str]) -> torch.Tensor:
    """Final hidden states at positions inside real prompts: the next word is far less certain there
    than in decode states, so a screen keeps many more candidates per row (open-ended text)."""
    rows = [it.ids for it in _items(engine, docstrings, 40)[:4]]
    with torch.inference_mode():
        states = [engine.decoder.body(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
                  for ids in rows]
    return torch.cat(states)[::3][:96].contiguous()


def _in_one_and_two_rounds(screen: head_screen.Screen, states: torch.Tensor,
                           monkeypatch: pytest.MonkeyPatch) -> dict[bool, tuple[torch.Tensor, torch.Tensor, int]]:
    """The screen's (tokens, sureness, words re-scored in fp32) with `pick`'s second round on and off."""
    out = {}
    counting = CountingRows(screen.source)
    monkeypatch.setattr(screen, "source", counting)
    with torch.inference_mode():
        for two in (True, False):
            monkeypatch.setattr(head_screen, "RULE_OUT", two)
            counting.words = 0
            ids, sure = screen.best(states)
            out[two] = (ids, sure, counting.words)
    return out


def test_the_int8_screen_rescores_only_the_candidates_its_first_round_leaves_open(
        int8_screen: Int8Screen, engine: Engine, prompt_states: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given hidden states inside real prompts, where many words come near the best
    # When the int8 screen picks their greedy tokens in two rounds (the default: the best fp32 score
    # of the candidates within one margin of the top rules out the candidates below it by more than
    # a margin) and in one (every candidate re-scored), counting the words re-scored in fp32
    rounds = _in_one_and_two_rounds(int8_screen, prompt_states, monkeypatch)
    (ids, sure, two), (ids_one, sure_one, one) = rounds[True], rounds[False]
    # Then both give the same tokens and the same sureness, every sure row the full layer's token
    assert torch.equal(ids, ids_one) and torch.equal(sure, sure_one)
    with torch.inference_mode():
        full = engine.decoder.logits(prompt_states).argmax(dim=-1)
    assert torch.equal(ids[sure], full[sure]) and int(sure.sum()) >= 0.8 * len(prompt_states)
    # and the two rounds re-scored under a third of the words one round does
    assert 0 < two < one / 3


def test_the_second_round_scores_what_the_first_cannot_rule_out_and_only_that() -> None:
    # Given one row's screen scores for eight words, a margin of 1 (every word's fp32 score within 1
    # of its screen score), and fp32 scores chosen so that the best word is not among those within
    # one margin of the top: A 10.0 / 9.1, B 9.5 / 9.6 (the first round: best fp32 9.6), C 8.5 / 9.3
    # (ruled out: below 9.6 - 1 on the screen), D 8.7 / 9.65 (left open, and the best), E 7.5 / 8.4
    # (no candidate: below 10 - 2)
    screen_scores = torch.tensor([[10.0, 9.5, 8.5, 8.7, 7.5, 0.0, 0.0, 0.0]])
    fp32 = torch.tensor([9.1, 9.6, 9.3, 9.65, 8.4, 0.0, 0.0, 0.0])
    weight = torch.zeros(8, 4)
    weight[:, 0] = fp32
    source = CountingRows(WeightRows(weight))
    hidden = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # When the search picks the row's word
    ids, sure, best = head_screen.pick(source, hidden, [screen_scores], screen_scores.amax(dim=1, keepdim=True),
                                       torch.tensor([10.0]), torch.tensor([1.0]), block_words=8)
    # Then it finds D, the fp32 best, having re-scored A, B and D but not C
    assert ids.tolist() == [3] and sure.tolist() == [True] and float(best[0]) == pytest.approx(9.65)
    assert source.words == 3


def test_the_bf16_screens_two_rounds_give_what_one_gives(sliced_head: torch.nn.Linear, prompt_states: torch.Tensor,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the bf16 screen over the output layer's first words and states inside real prompts
    # When it picks their greedy tokens in two rounds and in one
    rounds = _in_one_and_two_rounds(Bf16Screen(sliced_head), prompt_states[:32], monkeypatch)
    (ids, sure, two), (ids_one, sure_one, one) = rounds[True], rounds[False]
    # Then both give the same tokens and sureness, the full layer's for every sure row, and the
    # two rounds re-score no more words than one
    assert torch.equal(ids, ids_one) and torch.equal(sure, sure_one)
    with torch.inference_mode():
        full = (prompt_states[:32] @ sliced_head.weight.T).argmax(dim=-1)
    assert torch.equal(ids[sure], full[sure]) and bool(sure.any())
    assert two <= one


def test_the_int8_screen_sends_flat_rows_to_the_full_layer_and_breaks_ties_low(int8_screen: Int8Screen,
                                                                                sliced_head: torch.nn.Linear) -> None:
    with torch.inference_mode():
        # Given the int8 screen over the word table / When asked for rows that score every word the
        # same (zero): Then it is sure of none (every word is a candidate; none is re-scored)
        assert int8_screen.best(torch.zeros(3, sliced_head.in_features))[1].tolist() == [False] * 3
        # Given an int8 screen over the output layer's first words, two of which are the same word
        weight = sliced_head.weight.detach().clone()
        a, b = 5, 900
        weight[b] = weight[a]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight = torch.nn.Parameter(weight, requires_grad=False)
        screen = Int8Screen(head)
        # When asked for a row that prefers those two words: Then it is sure, and the lower id wins
        probe = (weight[a] / weight[a].norm() ** 2).unsqueeze(0)
        ids, sure = screen.best(probe)
        assert bool(sure[0]) and int(ids[0]) == a == int((probe @ weight.T).argmax())
        # and a row with no finite value is not vouched for, alone or beside a clear one (whose
        # answer it does not disturb)
        nan = torch.full_like(probe, float("nan"))
        assert not bool(screen.best(nan)[1][0])
        ids, sure = screen.best(torch.cat([nan, probe]))
        assert sure.tolist() == [False, True] and int(ids[1]) == a


@pytest.mark.parametrize("bf16, int8, int4_fits, kind", [
    (3.0, 5.0, True, "int8"), (3.0, 2.0, True, "bf16"), (3.0, None, True, "bf16"), (0.01, 2.0, True, "int8"),
    (0.01, 1.2, True, "int4"), (0.01, None, True, "int4"), (0.01, None, False, None)])
def test_each_cpu_gets_the_screen_it_runs_fastest(engine: Engine, bf16: float, int8: float | None, int4_fits: bool,
                                                  kind: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.model import head_screen as module

    # Given this machine's real probes of bf16 and of fbgemm's int8 against fp32 on a slice of the
    # layer, each recorded as choose_kind takes it (two separate probes of kernels within 25% of each
    # other can rank them either way on a busy machine, so the choice is held to the figures it saw)
    real: dict[str, float] = {}
    for name in ("bf16", "int8"):
        probe = getattr(module, f"{name}_speedup")
        monkeypatch.setattr(module, f"{name}_speedup",
                            lambda head, probe=probe, name=name, **kw: real.setdefault(name, probe(head, **kw)))
    chosen = module.choose_kind(engine.decoder.head)
    assert module.int8_applies() and set(real) == {"bf16", "int8"} and min(real.values()) > 0
    fastest = max(real, key=real.__getitem__)
    assert chosen == (fastest if real[fastest] >= module.FASTER else "int4" if module.int4_applies(engine.decoder.head)
                      else None), real
    # When a CPU's probes give these speed-ups (patched: one machine has only one kind of CPU;
    # None: fbgemm's engine is not this build's)
    monkeypatch.setattr(module, "bf16_speedup", lambda head, rounds=3, table=None: bf16)
    monkeypatch.setattr(module, "int8_speedup", lambda head, rounds=3, table=None: int8)
    monkeypatch.setattr(module, "int8_applies", lambda: int8 is not None)
    monkeypatch.setattr(module, "int4_applies", lambda head: int4_fits)
    # Then the kind whose kernel beats fp32 by most is chosen, if by FASTER, else int4 where its
    # kernel fits, else none
    assert module.choose_kind(engine.decoder.head) == kind


@pytest.mark.parametrize("engine_name, kind", [("x86", "int8"), ("qnnpack", "int4")])
def test_a_cpu_whose_bf16_is_slow_gets_the_int8_screen_or_else_int4(engine_name: str, kind: str) -> None:
    # Given a process whose oneDNN is held to AVX2 (no bf16 units: bf16 is slower than fp32 there,
    # on this machine as on any other), over a layer of the output layer's width; fbgemm's int8
    # kernel there, or a quantized engine other than fbgemm's (as on an Arm build)
    script = ("import sys, time, torch\n"
              "from worker.model import head_screen\n"
              "torch.backends.quantized.engine = sys.argv[1]\n"
              "head = torch.nn.Linear(640, 8192, bias=False)\n"
              "started = time.perf_counter()\n"
              "print(head_screen.bf16_speedup(head), head_screen.choose_kind(head), time.perf_counter() - started)\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", script, engine_name], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    speedup, chosen, seconds = done.stdout.split()
    # Then its probe finds bf16 slower and picks int8 where fbgemm runs (faster than fp32 on every
    # x86 CPU with AVX2), else int4, and settles it quickly (the bf16 probe stops at the first timed
    # round four times slower)
    assert float(speedup) < head_screen.FASTER and chosen == kind
    assert float(seconds) < 5


def test_a_row_without_a_clear_winner_is_scored_in_full(engine: Engine, int4_screen: HeadScreen) -> None:
    # Given a hidden state that scores every word the same (zero), and one built to tie two words
    decoder: Decoder = engine.decoder
    weight = decoder.head.weight
    a = 5
    probe = (weight[a] / weight[a].norm() ** 2).unsqueeze(0)
    with torch.inference_mode():
        flat = torch.zeros(1, weight.shape[1])
        # When the screen this CPU chose is asked for their tokens
        _, sure = decoder.ensure_screen().best(flat)
        before = decoder.unsure_rows
        # Then it is not sure of the flat row, which goes to the full layer: the lowest id, as argmax
        assert not bool(sure[0])
        assert decoder.best(flat) == [0] and decoder.unsure_rows == before + 1
    # and a tie among the int4 screen's candidates goes to the lowest id
    screen = int4_screen
    with torch.inference_mode():
        b = int(screen.scores(probe).topk(8).indices[0, -1])
        saved = weight[b].clone()
        try:
            weight[b] = weight[a]
            low = min(a, b)
            ids, _ = screen.best(probe)
            assert int(ids[0]) == low == int(decoder.logits(probe).argmax())
        finally:
            weight[b] = saved


def test_the_screen_is_built_once_greedy_work_has_earned_it_and_only_where_it_applies(
        loaded_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import decode

    # Given a fresh engine over the session's model
    engine = Engine(loaded_model, max_input_tokens=512, token_budget=1024, max_batch_size=8, max_new_tokens=8)
    # When it warms up, the warm-up's rows neither count towards the screen nor build it, even with
    # the bar at nothing (a slow first call beside a busy process must not spend the start on it)
    monkeypatch.setattr(decode, "SCREEN_AFTER_S", 0.0)
    engine.warm_up()
    assert engine.decoder.full_layer_s == 0 and engine.decoder.screen_trial is None and engine.decoder._screen is None
    assert engine.decoder.screen_wanted and engine.decoder.full_rows >= 2
    # and when it answers a short greedy prompt, it has no screen while the full layer's time
    # (counted) is short of what building one costs (the bar set out of reach here: a loaded machine
    # can stretch these few rows past the real 1.5 s); sampled rows are not counted at all
    monkeypatch.setattr(decode, "SCREEN_AFTER_S", 1e9)
    engine.generate(["The sky is"], max_new_tokens=4)
    spent, full = engine.decoder.full_layer_s, engine.decoder.full_rows
    engine.generate(["The sky is"], max_new_tokens=2, temperature=0.7, seed=1)
    assert engine.decoder.screen_wanted and engine.decoder._screen is None
    assert 0 < spent == engine.decoder.full_layer_s and full >= 4 and engine.decoder.full_rows == full
    # and once the full layer has taken SCREEN_AFTER_S, the next greedy row builds the screen, times
    # it against the full layer at 1, 8 and 32 rows per call (one prompt's step to a batch's), and
    # keeps it for calls up to the largest size at which it was faster
    monkeypatch.setattr(decode, "SCREEN_AFTER_S", spent)
    engine.generate(["The sky is"], max_new_tokens=2)
    trial = engine.decoder.screen_trial
    assert trial is not None and [size for size, _, _ in trial.sizes] == list(decode.TRIAL_SIZES) == [1, 8, 32]
    assert (trial.rows, trial.screen_s, trial.full_s) == trial.sizes[-1]
    won = [size for size, screen_s, full_s in trial.sizes if screen_s < full_s]
    assert trial.kept == bool(won) and trial.up_to == (won[-1] if won and won[-1] != 32 else None)
    assert (engine.decoder._screen is not None) == trial.kept
    # (its two greedy rows counted by the path they took: the screen, or the full layer uncounted by it)
    assert engine.decoder.screened_rows + engine.decoder.unsure_rows == (2 if trial.kept else 0)
    assert engine.decoder.full_rows == full + (0 if trial.kept else 2)
    # When turned off, no screen is built and greedy rows take the full layer
    off = Engine(loaded_model, max_input_tokens=512, token_budget=1024, max_batch_size=8, max_new_tokens=8,
                 head_screen=False)
    assert off.generate(["The sky is"], max_new_tokens=4)[0].text == engine.generate(["The sky is"], max_new_tokens=4)[0].text
    assert off.decoder.ensure_screen() is None and off.decoder.screened_rows == 0 and off.decoder.full_layer_s == 0
    # and a head it cannot stand in for (bias, soft-capping, a GPU, a quantized layer) is left alone
    head = engine.decoder.head
    assert head_screen.applies(head, device=torch.device("cpu"), softcap=None)
    assert not head_screen.applies(head, device=torch.device("cpu"), softcap=30.0)
    assert not head_screen.applies(head, device=torch.device("cuda"), softcap=None)
    assert not head_screen.applies(torch.nn.Linear(640, 4096, bias=True), device=torch.device("cpu"), softcap=None)


@pytest.mark.parametrize("slow", ["screen", "full layer"])
def test_the_screen_is_kept_only_where_it_beats_the_full_layer(loaded_model, slow: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import decode

    # Given a fresh engine whose screen or full layer is made slower (which is faster depends on
    # the CPU's kernels: on one machine the int4 screen was 3x faster, on another slower)
    engine = Engine(loaded_model, max_input_tokens=512, token_budget=1024, max_batch_size=8, max_new_tokens=8)
    expected = engine.generate(["The sky is", "Water boils at"], max_new_tokens=6)
    kind = head_screen.choose_kind(engine.decoder.head)
    monkeypatch.setattr(head_screen, "choose_kind", lambda head, table=None: kind)  # the same kind in the trial
    target, name = (SCREENS[kind], "best") if slow == "screen" else (Decoder, "best_blocked")
    original = getattr(target, name)

    def slowed(self, hidden):
        time.sleep(1.0)  # more than either path takes on a busy 2-core machine
        return original(self, hidden)

    monkeypatch.setattr(target, name, slowed)
    monkeypatch.setattr(decode, "SCREEN_AFTER_S", 0.0)
    # When greedy work reaches the screen's trial
    got = engine.generate(["The sky is", "Water boils at"], max_new_tokens=6)
    # Then the faster path was kept, the tokens are the full layer's either way, and a dropped
    # screen is gone for good: later greedy rows all take the full layer
    trial = engine.decoder.screen_trial
    assert trial is not None and trial.kept == (slow == "full layer") and trial.kind == kind
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert (engine.decoder.screen is not None) == trial.kept
    screened = engine.decoder.screened_rows
    engine.generate(["The sky is"], max_new_tokens=3)
    assert (engine.decoder.screened_rows > screened) == trial.kept and engine.decoder.screen_trial is trial


def test_a_screen_that_wins_only_for_few_rows_answers_only_calls_that_few(loaded_model, states: torch.Tensor,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import decode

    # Given a fresh engine whose screen's time grows with the rows far faster than the full
    # layer's (as the int4 screen's does on the AVX2 machine): 15 ms a row against 200 ms a call
    engine = Engine(loaded_model, max_input_tokens=512, token_budget=1024, max_batch_size=8, max_new_tokens=8)
    kind = head_screen.choose_kind(engine.decoder.head)
    monkeypatch.setattr(head_screen, "choose_kind", lambda head, table=None: kind)
    screen_class = SCREENS[kind]
    screen_best, full_best = screen_class.best, Decoder.best_blocked

    def slow_screen(self, hidden):
        time.sleep(0.015 * hidden.shape[0])
        return screen_best(self, hidden)

    def slow_full(self, hidden):
        time.sleep(0.2)
        return full_best(self, hidden)

    monkeypatch.setattr(screen_class, "best", slow_screen)
    monkeypatch.setattr(Decoder, "best_blocked", slow_full)
    monkeypatch.setattr(decode, "SCREEN_AFTER_S", 0.0)
    decoder = engine.decoder
    # When its first greedy row goes through the trial
    hidden = states[:20].contiguous()
    assert decoder.best(hidden[:1]) == full_best(decoder, hidden[:1])
    # Then the screen won at 1 and 8 rows and lost at 32, and is kept for calls of up to 8 rows
    trial = decoder.screen_trial
    assert [(size, s < f) for size, s, f in trial.sizes] == [(1, True), (8, True), (32, False)]
    assert trial.kept and trial.up_to == 8 and decoder.screen is not None
    # so a call of 8 rows is screened (or sent row by row to the full layer where the margin says
    # so), and each call gets the full layer's tokens
    counted, full = decoder.screened_rows + decoder.unsure_rows, decoder.full_rows
    assert decoder.best(hidden[:8]) == full_best(decoder, hidden[:8])
    assert decoder.screened_rows + decoder.unsure_rows == counted + 8 and decoder.screened_rows > 0
    assert decoder.full_rows == full
    # With the trial's times set to the sleeps alone (on a busy machine the real work blurs them):
    # a call of 12 is screened in pieces of 8 and 4 (about 180 ms against 200 ms whole), a call of
    # 20 goes whole to the full layer (8 + 8 + 4 would take about 300 ms; counted as not offered to
    # the screen)
    trial = decoder.screen_trial = dataclasses.replace(trial, sizes=[(1, 0.015, 0.2), (8, 0.12, 0.2),
                                                                      (32, 0.48, 0.2)])
    assert trial.pieces(12) == 8 and trial.pieces(20) is None
    assert decoder.best(hidden[:12]) == full_best(decoder, hidden[:12])
    assert decoder.screened_rows + decoder.unsure_rows == counted + 20 and decoder.full_rows == full
    assert decoder.best(hidden[:20]) == full_best(decoder, hidden[:20])
    assert decoder.screened_rows + decoder.unsure_rows == counted + 20 and decoder.full_rows == full + 20


def test_a_trial_says_which_larger_calls_pay_screened_in_pieces() -> None:
    # Given the int4 screen's trial on the 2-core AVX2 machine (docs/PERFORMANCE.md): 1, 8 and 32
    # rows in 15.1 / 62.6 / 219.4 ms screened against 46.6 / 125.5 / 159.1 ms in full
    from worker.decode import ScreenTrial
    trial = ScreenTrial(rows=32, screen_s=0.2194, full_s=0.1591, kept=True, up_to=8,
                        sizes=[(1, 0.0151, 0.0466), (8, 0.0626, 0.1255), (32, 0.2194, 0.1591)])
    # Then times between and beyond the sizes are read off the lines through them
    assert trial.seconds(8, screen=True) == pytest.approx(0.0626)
    assert trial.seconds(20, screen=False) == pytest.approx((0.1255 + 0.1591) / 2)
    assert trial.seconds(40, screen=False) == pytest.approx(0.1591 + 8 * (0.1591 - 0.1255) / 24)
    # and a call of 9 to 16 rows is screened in pieces of 8 (10 rows: 62.6 + 21.9 ms against 128.3 ms),
    # while from 17 rows on the full layer is faster, as is every call a screen answers whole
    assert [n for n in range(1, 65) if trial.pieces(n)] == list(range(9, 17))
    assert all(trial.pieces(n) in (None, 8) for n in range(1, 65))
    # A dropped screen, or one kept for every call, is never split
    assert ScreenTrial(rows=32, screen_s=0.3, full_s=0.1, kept=False, sizes=trial.sizes).pieces(10) is None
    assert ScreenTrial(rows=32, screen_s=0.1, full_s=0.3, kept=True, sizes=trial.sizes).pieces(40) is None


def test_the_cli_turns_the_screen_on_unless_told_not_to(engine: Engine) -> None:
    # Given one prompt generated greedily through the CLI, with the screen and without it
    on = run_cli("generate", "The capital of France is", "--max-tokens", "6", "--device", "cpu", "--log-level", "INFO")
    off = run_cli("generate", "The capital of France is", "--max-tokens", "6", "--device", "cpu", "--log-level", "INFO",
                  env={"GEMMA_BATCH_HEAD_SCREEN": "false"})
    assert on.returncode == 0 and off.returncode == 0, (on.stderr, off.stderr)
    # Then the first has the screen on, to be built once greedy work earns it (six tokens do not),
    # the second the full layer only, and both print the same text
    assert "greedy head: bf16, int8 or int4 screen" in on.stderr and "greedy head screen built" not in on.stderr
    assert "greedy head: full output layer" in off.stderr
    assert on.stdout == off.stdout


def test_reembed_children_keep_the_screen_and_drafts_settings() -> None:
    from cli import settings_env
    from worker.settings import Settings

    assert settings_env(Settings(head_screen=False))["GEMMA_BATCH_HEAD_SCREEN"] == "false"
    assert settings_env(Settings(drafts=False))["GEMMA_BATCH_DRAFTS"] == "false"
    assert not {"GEMMA_BATCH_HEAD_SCREEN", "GEMMA_BATCH_DRAFTS"} & set(settings_env(Settings()))
