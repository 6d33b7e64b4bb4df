"""The greedy head alone: each screen this CPU can build (worker/model/head_screen.py: bf16, int8, int4)
against the full output layer in fp32 blocks (`Decoder.best_blocked`, what `--no-head-screen`
runs), on real decode states, at several rows per call.

Beside them, two baselines in the same rounds: the full layer in fp32 blocks multiplied the other
way round (`linear(hidden, block)`, as `best_blocked` did before `table.scores`), and full logits
(what sampling and grammars need) from the word table's int8 blocks (`table.project`, the output
layer's forward on a CPU fp32 worker) against `linear` over the fp32 weight itself.

The states are the final hidden states the decoder handed its greedy head while generating for the
bench's prompts. Each contender answers the same calls; in every round the contenders run in turn,
forwards then backwards (so a slow spell of the shared machine falls on all of them alike), and the
figure is the mean time per call over all rounds. Every screened answer is checked against the
full layer's: a row the screen vouches for must get the same token."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import table
from bench.generation import prompts
from worker.engine import Engine
from worker.model import head_screen
from worker.model.table import rows_of


def decode_states(engine: Engine, *, n: int, steps: int) -> torch.Tensor:
    """The hidden states the greedy head received while generating `steps` tokens for `n` prompts,
    one token per row and step (no prompt-lookup drafts: one state per token)."""
    decoder = engine.decoder
    if decoder is None:
        raise ValueError(f"model {engine.name} has no merged decoder (embedding-only or not on this path)")
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> list[int]:
        captured.append(hidden.detach().clone())
        return decoder.best_blocked(hidden)

    decoder.best = capture  # an instance attribute over the method, removed below
    drafts, decoder.draft_tokens = decoder.draft_tokens, 0
    try:
        engine.generate_tokenized(prompts(engine, n), max_new_tokens=steps)
    finally:
        del decoder.best
        decoder.draft_tokens = drafts
    return torch.cat(captured)


def prompt_states(engine: Engine, *, n: int, count: int) -> torch.Tensor:
    """`count` final hidden states from inside `n` of the bench's prompts (every position scored by
    one forward pass, evenly spaced picks): the next word there is far less certain than in the
    decode states, so a screen keeps more candidates per row, as for open-ended text."""
    states = []
    with torch.inference_mode():
        for item in prompts(engine, n):
            out = engine.decoder.body(input_ids=torch.tensor([item.ids]), use_cache=False)
            states.append(out.last_hidden_state[0])
    every = torch.cat(states)
    return every[torch.linspace(0, every.shape[0] - 1, count).long()].contiguous()


class CountingRows:
    """A screen's fp32 rows (`Int8Table` or `WeightRows`), counting the words `pick` re-scores (also
    tests/worker/model/test_head_screen.py's)."""

    def __init__(self, source: Any) -> None:
        self.source, self.words = source, 0

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        self.words += ids.numel()
        return self.source.rows(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


def rule_out(screen: head_screen.Screen, sets: dict[str, torch.Tensor], *, rows: int = 128,
             rounds: int = 3) -> dict[str, Any]:
    """`head_screen.pick` in two rounds (the default: the best of the candidates within one margin
    rules out the rest it can) against one (`RULE_OUT` off: every candidate re-scored in fp32), on
    calls of `rows` states from each set, alternating: ms per call, words re-scored per row, and
    whether both gave the same tokens and sureness."""
    result: dict[str, Any] = {"kind": screen.kind, "rows": rows, "rounds": rounds, "sets": {}}
    source = screen.source
    counting = screen.source = CountingRows(source)
    try:
        with torch.inference_mode():
            for name, states in sets.items():
                calls = [states[i: i + rows] for i in range(0, states.shape[0] - rows + 1, rows)]
                spent, words = {True: 0.0, False: 0.0}, {True: 0, False: 0}
                answers: dict[bool, list[Any]] = {True: [], False: []}
                for r in range(rounds + 1):  # round 0 warms both and keeps their answers
                    for two in ((True, False) if r % 2 == 0 else (False, True)):
                        head_screen.RULE_OUT = two
                        for hidden in calls:
                            counting.words = 0
                            started = time.perf_counter()
                            ids, sure = screen.best(hidden)
                            elapsed = time.perf_counter() - started
                            if r == 0:
                                answers[two].append((ids.tolist(), sure.tolist()))
                            else:
                                spent[two] += elapsed
                                words[two] += counting.words
                record = {"calls": len(calls), "same": answers[True] == answers[False]}
                per_call = rounds * len(calls)
                record.update({"ms_two_rounds": spent[True] / per_call * 1000, "ms_one_round": spent[False] / per_call * 1000,
                               "words_per_row_two_rounds": words[True] / (per_call * rows),
                               "words_per_row_one_round": words[False] / (per_call * rows)})
                result["sets"][name] = record
    finally:
        head_screen.RULE_OUT = True
        screen.source = source
    return result


def best_by_linear(decoder: Any, hidden: torch.Tensor) -> list[int]:
    """`Decoder.best_blocked` with each block's scores as `linear(hidden, block)` (the baseline for
    `table.scores`'s orientation); same blocks, same running maximum."""
    best_score = torch.full((hidden.shape[0],), float("-inf"))
    best_id = torch.zeros(hidden.shape[0], dtype=torch.long)
    for start, rows in rows_of(decoder.head, decoder.table).blocks(decoder.vocab_block):
        score, index = torch.nn.functional.linear(hidden, rows).max(dim=-1)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_id = torch.where(better, index + start, best_id)
    return best_id.tolist()


def measure(engine: Engine, *, n: int = 16, steps: int = 16, rows: tuple[int, ...] = (1, 8, 32, 64),
            calls: int = 4, rounds: int = 3) -> dict[str, Any]:
    """Per rows-per-call setting, ms per call of the full layer and of each screen that applies here,
    over `calls` distinct slices of the decode states, `rounds` rounds; and per screen, how many rows
    it vouched for and whether each of those got the full layer's token."""
    decoder = engine.decoder
    states = decode_states(engine, n=n, steps=steps)
    result: dict[str, Any] = {"states": int(states.shape[0]), "rows": list(rows), "calls": calls, "rounds": rounds,
                              "choose_kind": None, "bf16_speedup_probe": None, "int8_speedup_probe": None, "screens": {},
                              "ms_per_call": {},
                              "linear_same_tokens": 0, "linear_calls": 0}
    if decoder is None or not head_screen.applies(decoder.head, device=decoder.device, softcap=decoder.softcap):
        result["skipped"] = "no screen applies to this output layer here"
        return result
    head = decoder.head
    result["bf16_speedup_probe"] = head_screen.bf16_speedup(head, table=decoder.table)
    if head_screen.int8_applies():
        result["int8_speedup_probe"] = head_screen.int8_speedup(head, table=decoder.table)
    result["choose_kind"] = head_screen.choose_kind(head, decoder.table)
    kinds = (["bf16"] + (["int8"] if head_screen.int8_applies() else [])
             + (["int4"] if head_screen.int4_applies(head) else []))
    screens = {}
    for kind in kinds:
        started = time.perf_counter()
        screens[kind] = head_screen.build(head, kind, decoder.table)
        result["screens"][kind] = {"build_s": time.perf_counter() - started, "vouched": 0, "same_as_full": 0,
                                   "answered": 0}
    contenders: dict[str, Callable[[torch.Tensor], Any]] = {"full": decoder.best_blocked,
                                                              "full, linear": lambda hidden: best_by_linear(decoder, hidden)}
    contenders.update({kind: screen.best for kind, screen in screens.items()})
    weight = head.weight.detach()
    contenders["logits, table"] = head  # the output layer's forward: table.project where the loader installed the table
    contenders["logits, fp32 weight"] = lambda hidden: torch.nn.functional.linear(hidden, weight)
    with torch.inference_mode():
        for size in rows:
            slices = [states[i * size: (i + 1) * size] for i in range(calls) if (i + 1) * size <= states.shape[0]]
            if not slices:
                continue
            for hidden in slices:  # agreement, once per slice: the full layer's answer, then each screen's
                full = decoder.best_blocked(hidden)
                result["linear_same_tokens"] += best_by_linear(decoder, hidden) == full
                result["linear_calls"] += 1
                for kind, screen in screens.items():
                    ids, sure = screen.best(hidden)
                    record = result["screens"][kind]
                    record["answered"] += len(full)
                    record["vouched"] += int(sure.sum())
                    record["same_as_full"] += sum(1 for token, want, vouched in zip(ids.tolist(), full, sure.tolist())
                                                  if vouched and token == want)
            spent = dict.fromkeys(contenders, 0.0)
            for name in contenders:  # warm each kernel at this size
                contenders[name](slices[0])
            for r in range(rounds):
                order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
                for name in order + order[::-1]:
                    for hidden in slices:
                        started = time.perf_counter()
                        contenders[name](hidden)
                        spent[name] += time.perf_counter() - started
            per_call = 2 * rounds * len(slices)
            result["ms_per_call"][str(size)] = {name: seconds / per_call * 1000 for name, seconds in spent.items()}
    if result["choose_kind"] in ("bf16", "int8") and states.shape[0] >= 128:  # the screens `pick` serves
        result["rule_out"] = rule_out(screens[result["choose_kind"]], {"decode": states, "prompt": prompt_states(
            engine, n=n, count=max(256, states.shape[0] // 128 * 128))})
    return result


def render(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"\nGREEDY HEAD: skipped ({r['skipped']})"
    kinds = list(r["screens"])
    rows = []
    logits = []
    for size, ms in r["ms_per_call"].items():
        rows.append([size, ms["full"], ms["full, linear"], *[ms[k] for k in kinds], *[ms["full"] / ms[k] for k in kinds]])
        logits.append([size, ms["logits, table"], ms["logits, fp32 weight"], ms["logits, fp32 weight"] / ms["logits, table"]])
    lines = [f"\nGREEDY HEAD ({r['states']} real decode states; ms per call, mean of {r['rounds']} interleaved "
             f"rounds; this CPU's decoder picks {r['choose_kind']}, bf16 probe {r['bf16_speedup_probe']:.2f}x fp32"
             + (f", int8 probe {r['int8_speedup_probe']:.2f}x" if r.get("int8_speedup_probe") else "") + ")",
             table(["rows", "full layer fp32", "same, linear(h, W)", *[f"{k} screen" for k in kinds],
                    *[f"{k} is" for k in kinds]], rows),
             f"full layer both ways round: the same tokens in {r['linear_same_tokens']} of {r['linear_calls']} calls",
             "\nFULL LOGITS (sampling, grammars; same rounds): from the int8 word table vs linear over the fp32 weight",
             table(["rows", "from the table", "fp32 weight", "table is"], logits)]
    for kind, s in r["screens"].items():
        lines.append(f"{kind} screen: built in {s['build_s']:.2f} s; vouched for {s['vouched']} of "
                     f"{s['answered']} rows, {s['same_as_full']} of them the full layer's token")
    if r.get("rule_out"):
        ro = r["rule_out"]
        lines.append(f"\nCANDIDATES RE-SCORED IN TWO ROUNDS ({ro['kind']} screen, calls of {ro['rows']} rows, "
                     f"{ro['rounds']} interleaved rounds; decode states, and states inside the prompts)")
        lines.append(table(["states", "calls", "ms two rounds", "ms one round", "two rounds is", "words/row two",
                            "words/row one", "same answers"],
                           [[name, s["calls"], s["ms_two_rounds"], s["ms_one_round"], s["ms_one_round"] / s["ms_two_rounds"],
                             s["words_per_row_two_rounds"], s["words_per_row_one_round"], s["same"]]
                            for name, s in ro["sets"].items()]))
    return "\n".join(lines)
