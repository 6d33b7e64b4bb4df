"""The greedy head alone: each screen this CPU can build (worker/model/head_screen.py: bf16, int4)
against the full output layer in fp32 blocks (`Decoder.best_blocked`, what `--no-head-screen`
runs), on real decode states, at several rows per call.

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


def decode_states(engine: Engine, *, n: int, steps: int) -> torch.Tensor:
    """The hidden states the greedy head received while generating `steps` tokens for `n` prompts."""
    decoder = engine.decoder
    if decoder is None:
        raise ValueError(f"model {engine.name} has no merged decoder (embedding-only or not on this path)")
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> list[int]:
        captured.append(hidden.detach().clone())
        return decoder.best_blocked(hidden)

    decoder.best = capture  # an instance attribute over the method, removed below
    try:
        engine.generate_tokenized(prompts(engine, n), max_new_tokens=steps)
    finally:
        del decoder.best
    return torch.cat(captured)


def measure(engine: Engine, *, n: int = 16, steps: int = 16, rows: tuple[int, ...] = (1, 8, 32, 64),
            calls: int = 4, rounds: int = 3) -> dict[str, Any]:
    """Per rows-per-call setting, ms per call of the full layer and of each screen that applies here,
    over `calls` distinct slices of the decode states, `rounds` rounds; and per screen, how many rows
    it vouched for and whether each of those got the full layer's token."""
    decoder = engine.decoder
    states = decode_states(engine, n=n, steps=steps)
    result: dict[str, Any] = {"states": int(states.shape[0]), "rows": list(rows), "calls": calls, "rounds": rounds,
                              "choose_kind": None, "bf16_speedup_probe": None, "screens": {}, "ms_per_call": {}}
    if decoder is None or not head_screen.applies(decoder.head, device=decoder.device, softcap=decoder.softcap):
        result["skipped"] = "no screen applies to this output layer here"
        return result
    head = decoder.head
    result["bf16_speedup_probe"] = head_screen.bf16_speedup(head)
    result["choose_kind"] = head_screen.choose_kind(head)
    kinds = ["bf16"] + (["int4"] if head_screen.int4_applies(head) else [])
    screens = {}
    for kind in kinds:
        started = time.perf_counter()
        screens[kind] = head_screen.build(head, kind)
        result["screens"][kind] = {"build_s": time.perf_counter() - started, "vouched": 0, "same_as_full": 0,
                                   "answered": 0}
    contenders: dict[str, Callable[[torch.Tensor], Any]] = {"full": decoder.best_blocked}
    contenders.update({kind: screen.best for kind, screen in screens.items()})
    with torch.inference_mode():
        for size in rows:
            slices = [states[i * size: (i + 1) * size] for i in range(calls) if (i + 1) * size <= states.shape[0]]
            if not slices:
                continue
            for hidden in slices:  # agreement, once per slice: the full layer's answer, then each screen's
                full = decoder.best_blocked(hidden)
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
    return result


def render(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"\nGREEDY HEAD: skipped ({r['skipped']})"
    kinds = list(r["screens"])
    rows = []
    for size, ms in r["ms_per_call"].items():
        rows.append([size, ms["full"], *[ms[k] for k in kinds], *[ms["full"] / ms[k] for k in kinds]])
    lines = [f"\nGREEDY HEAD ({r['states']} real decode states; ms per call, mean of {r['rounds']} interleaved "
             f"rounds; this CPU's decoder picks {r['choose_kind']}, bf16 probe {r['bf16_speedup_probe']:.2f}x fp32)",
             table(["rows", "full layer fp32", *[f"{k} screen" for k in kinds], *[f"{k} is" for k in kinds]], rows)]
    for kind, s in r["screens"].items():
        lines.append(f"{kind} screen: built in {s['build_s']:.2f} s; vouched for {s['vouched']} of "
                     f"{s['answered']} rows, {s['same_as_full']} of them the full layer's token")
    return "\n".join(lines)
