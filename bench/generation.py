"""Generation: our engine against Hugging Face `generate` one prompt at a time (the naive baseline:
the checkpoint loaded afresh by transformers, none of the engine's changes to its layers) and
llama.cpp (`llama-cpp-python`, sequential, same GGUF file, same thread count), on the same
prompts and token ids, greedy, `max_new_tokens` each. Output tokens/s for each and the ratios, and
how many of our outputs equal the one-at-a-time outputs token for token (the exactness check)."""
from __future__ import annotations

import gc
import logging
from dataclasses import asdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import alternating, chat_prompt, mixed_length, table, timed
from worker.corpus import stdlib_docstrings
from worker.decoding import stop_window
from worker.engine import Engine, Tokenized, plan_batches

log = logging.getLogger(__name__)


def prompts(engine: Engine, n: int, *, longest: int = 400, shortest: int = 0) -> list[Tokenized]:
    """n chat prompts over real docstrings, from a few dozen tokens (or `shortest`) to about `longest`."""
    docs = [" ".join(d.split()) for d in stdlib_docstrings(min_chars=20, max_chars=4000)]
    items = engine.tokenize([chat_prompt(d) for d in docs], truncate=True, what="prompt")
    lengths = [len(it.ids) if len(it.ids) >= shortest else longest + 1 for it in items]  # too short: left out
    picked = mixed_length(lengths, n, longest=longest)
    return [items[i] for i in picked]


def run_ours(engine: Engine, items: list[Tokenized], max_new_tokens: int) -> tuple[list[list[int]], float]:
    out = timed(lambda: engine.generate_tokenized(items, max_new_tokens=max_new_tokens))
    return [g.token_ids for g in out.value], out.seconds


def stock_model(engine: Engine, model_dir: Path) -> Any:
    """The engine's checkpoint as a user loads it with transformers (`AutoModelForCausalLM`, the
    engine's dtype and device, SDPA attention): a model of its own, so none of the engine's changes
    to its layers (oneDNN linear layers, fused norms, packed attention, the int8 word table's output
    layer) reach the naive baseline."""
    from transformers import AutoModelForCausalLM

    placement = engine.model.placement
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=placement.dtype, use_safetensors=True,
                                                attn_implementation="sdpa").to(placement.device).eval()


def run_hf_one_at_a_time(lm: Any, engine: Engine, items: list[Tokenized],
                         max_new_tokens: int) -> tuple[list[list[int]], float]:
    """`lm.generate` on each prompt in turn (`lm` from `stock_model`), greedy, stopping at the
    engine's end-of-turn ids; the engine lends only its tokenizer's pad id and its device."""
    eos = sorted(engine.eos_ids)

    def one(ids: tuple[int, ...]) -> list[int]:
        with torch.inference_mode():
            out = lm.generate(input_ids=torch.tensor([ids], device=engine.device), max_new_tokens=max_new_tokens,
                              do_sample=False, top_k=None, top_p=None, temperature=None, eos_token_id=eos,
                              pad_token_id=engine.tokenizer.pad_token_id)
        row = out[0, len(ids):].tolist()
        cut = next((j for j, t in enumerate(row) if t in engine.eos_ids), None)
        return row if cut is None else row[:cut]

    done = timed(lambda: [one(it.ids) for it in items])
    return done.value, done.seconds


def time_stock_one_at_a_time(engine: Engine, model_dir: Path, items: list[Tokenized], max_new_tokens: int, *,
                             warm: list[Tokenized], warm_tokens: int) -> tuple[list[list[int]], float]:
    """The naive baseline end to end: `stock_model` loaded, warmed on `warm` (untimed), timed on
    `items`, then freed (its memory back before the next contender runs)."""
    stock = stock_model(engine, model_dir)
    try:
        run_hf_one_at_a_time(stock, engine, warm, warm_tokens)
        return run_hf_one_at_a_time(stock, engine, items, max_new_tokens)
    finally:
        del stock
        gc.collect()
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()


def run_llama_cpp(gguf: str, items: list[Tokenized], max_new_tokens: int,
                  threads: int) -> tuple[list[tuple[int, str]], float, float]:
    """(token count, text) per prompt, seconds, and the load time. Prompts go in as our token ids
    (the GGUF carries the same vocabulary), so both engines read identical inputs."""
    from llama_cpp import Llama

    loaded = timed(lambda: Llama(model_path=gguf, n_ctx=1024, n_batch=512, n_threads=threads,
                                 n_threads_batch=threads, verbose=False))
    llm = loaded.value

    def one(ids: tuple[int, ...]) -> tuple[int, str]:
        out = llm.create_completion(prompt=list(ids), max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        return int(out["usage"]["completion_tokens"]), str(out["choices"][0]["text"])

    done = timed(lambda: [one(it.ids) for it in items])
    return done.value, done.seconds, loaded.seconds


def shared_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items two sequences (token ids, or a text's characters) have in common."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(ours: list[list[int]], reference: list[list[int]]) -> dict[str, Any]:
    same = sum(a == b for a, b in zip(ours, reference))
    return {"identical": same, "of": len(ours), "shortest_common_prefix": min(map(shared_prefix, ours, reference))}


def text_agreement(texts: list[str], reference: list[str]) -> dict[str, Any]:
    """How many outputs equal the reference's text, and the mean share of each reference text
    before the first differing character (for a peer whose token ids are not at hand)."""
    shares = [shared_prefix(a, b) / max(len(b), 1) for a, b in zip(texts, reference)]
    return {"identical": sum(a == b for a, b in zip(texts, reference)), "of": len(texts),
            "mean_shared_prefix": sum(shares) / max(len(shares), 1)}


def measure(engine: Engine, *, n: int, max_new_tokens: int, gguf: str | None, model_dir: Path,
            naive_every: int = 1, int4: Engine | None = None) -> dict[str, Any]:
    """`model_dir`: the engine's prepared checkpoint, which the naive baseline loads afresh
    (`stock_model`). `naive_every` > 1 runs the slow one-at-a-time baseline on every k-th prompt
    only (a quick run); its rate is then over that subset, which spans the same length range. `int4`, an engine built
    with `--quantize int4` (lossy), is timed on the same prompts beside the exact one; its outputs
    and llama.cpp's are compared with our exact outputs as text."""
    items = prompts(engine, n)
    threads = torch.get_num_threads()
    log.info("generation: %d prompts, %d to %d tokens, %d new tokens each", len(items),
             min(len(i.ids) for i in items), max(len(i.ids) for i in items), max_new_tokens)
    engine.generate_tokenized(items[:2], max_new_tokens=4)  # warm both paths' lazy set-up
    decoder = engine.decoder
    # As in a fresh worker, the timed run builds the head screen once its greedy rows have spent
    # SCREEN_AFTER_S in the full layer, and keeps it only if it beats the full layer (both inside the timing)
    screened, unsure, full = decoder.screened_rows, decoder.unsure_rows, decoder.full_rows
    drafted, accepted, steps = decoder.drafted, decoder.accepted, decoder.steps
    ours_tokens, ours_s = run_ours(engine, items, max_new_tokens)
    drafts = {"drafted": decoder.drafted - drafted, "accepted": decoder.accepted - accepted,
              "steps": decoder.steps - steps}
    # "full_rows": rows the screen was unsure of (the key earlier results use); "unscreened_rows":
    # rows no screen was asked about (before its trial, or calls larger than it won at)
    screen = {"screened_rows": decoder.screened_rows - screened, "full_rows": decoder.unsure_rows - unsure,
              "unscreened_rows": decoder.full_rows - full,
              "trial": None if decoder.screen_trial is None else asdict(decoder.screen_trial)}
    decode = engine.tokenizer.decode
    ours_texts = [decode(t, skip_special_tokens=True) for t in ours_tokens]
    subset = list(range(0, len(items), naive_every))
    naive_tokens, naive_s = time_stock_one_at_a_time(engine, model_dir, [items[i] for i in subset], max_new_tokens,
                                                     warm=items[:1], warm_tokens=4)  # warmed, as ours was
    result: dict[str, Any] = {
        "prompts": len(items), "prompt_tokens": sum(len(i.ids) for i in items), "max_new_tokens": max_new_tokens,
        "threads": threads,
        "ours": {"tokens": sum(map(len, ours_tokens)), "seconds": ours_s},
        "hf_one_at_a_time": {"prompts": len(subset), "tokens": sum(map(len, naive_tokens)), "seconds": naive_s,
                             "model": "stock"},
        "greedy_agreement": agreement([ours_tokens[i] for i in subset], naive_tokens),
    }
    if decoder.screen_wanted:  # the same engine with every word of the output layer scored in fp32
        decoder.screen_wanted = False
        try:
            full_tokens, full_s = run_ours(engine, items, max_new_tokens)
        finally:
            decoder.screen_wanted = True
        result["ours_full_head"] = {"tokens": sum(map(len, full_tokens)), "seconds": full_s}
        result["head_screen"] = {**screen, "agreement_with_full_head": agreement(ours_tokens, full_tokens)}
    if decoder.draft_tokens:  # the same engine, one token per row and step (no prompt-lookup drafts)
        result["drafts"] = {**drafts, **measure_drafts(engine, items, max_new_tokens, ours_tokens)}
    if int4 is not None:
        int4.generate_tokenized(items[:2], max_new_tokens=4)
        lossy_tokens, lossy_s = run_ours(int4, items, max_new_tokens)
        result["ours_int4"] = {"tokens": sum(map(len, lossy_tokens)), "seconds": lossy_s,
                               "agreement_with_exact": text_agreement(
                                   [decode(t, skip_special_tokens=True) for t in lossy_tokens], ours_texts)}
    if gguf is not None:
        outputs, seconds, load_s = run_llama_cpp(gguf, items, max_new_tokens, threads)
        result["llama_cpp"] = {"tokens": sum(c for c, _ in outputs), "seconds": seconds, "load_seconds": load_s,
                               "agreement_with_exact": text_agreement([t for _, t in outputs], ours_texts)}
    for key in ("ours", "ours_full_head", "ours_int4", "hf_one_at_a_time", "llama_cpp"):
        if key in result:
            result[key]["tokens_per_s"] = result[key]["tokens"] / result[key]["seconds"]
    ours_rate = result["ours"]["tokens_per_s"]
    result["ratio_vs_hf_one_at_a_time"] = ours_rate / result["hf_one_at_a_time"]["tokens_per_s"]
    if "llama_cpp" in result:
        result["ratio_vs_llama_cpp"] = ours_rate / result["llama_cpp"]["tokens_per_s"]
        if "ours_int4" in result:
            result["int4_ratio_vs_llama_cpp"] = result["ours_int4"]["tokens_per_s"] / result["llama_cpp"]["tokens_per_s"]
    return result


def measure_drafts(engine: Engine, items: list[Tokenized], max_new_tokens: int,
                   ours_tokens: list[list[int]], *, alone: int = 4) -> dict[str, Any]:
    """Our engine without prompt-lookup drafts (`Decoder.draft_tokens` 0) on the same prompts, and
    `alone` of them (spread over the lengths) each generated on its own with and without drafts,
    alternating (a lone request, where a step's cost is its weights' reads): seconds and agreement."""
    decoder = engine.decoder
    kept = decoder.draft_tokens
    picked = items[:: max(1, len(items) // alone)][:alone]
    single: dict[str, list[float]] = {"drafts": [], "none": []}
    single_tokens: dict[str, list[list[int]]] = {"drafts": [], "none": []}
    try:
        decoder.draft_tokens = 0
        plain_tokens, plain_s = run_ours(engine, items, max_new_tokens)
        # ours again, now on the footing of the run without drafts: the timed first run also built the
        # greedy head's screen and ran its trial (as a fresh worker does), this one and that one do not
        decoder.draft_tokens = kept
        again_tokens, again_s = run_ours(engine, items, max_new_tokens)
        for item in picked:
            for name, count in (("drafts", kept), ("none", 0)):
                decoder.draft_tokens = count
                tokens, seconds = run_ours(engine, [item], max_new_tokens)
                single[name].append(seconds)
                single_tokens[name].extend(tokens)
    finally:
        decoder.draft_tokens = kept
    return {"no_drafts": {"tokens": sum(map(len, plain_tokens)), "seconds": plain_s,
                          "agreement": agreement(ours_tokens, plain_tokens)},
            "drafts_again": {"tokens": sum(map(len, again_tokens)), "seconds": again_s,
                             "agreement": agreement(ours_tokens, again_tokens)},
            "alone": {"prompts": len(picked), "seconds_with": sum(single["drafts"]), "seconds_without": sum(single["none"]),
                      "agreement": agreement(single_tokens["drafts"], single_tokens["none"])}}


def render(r: dict[str, Any]) -> str:
    rows = [["ours (merged decoder)", r["ours"]["tokens"], r["ours"]["seconds"], r["ours"]["tokens_per_s"], "1.00"]]
    for key, label in (("ours_full_head", "ours, --no-head-screen"),
                       ("ours_int4", "ours, --quantize int4 (lossy)"),
                       ("hf_one_at_a_time", "HF generate, one at a time"),
                       ("llama_cpp", "llama-cpp-python, sequential (Q4_K_M)")):
        if key in r:
            rate = r[key]["tokens_per_s"]
            # "ours is" compares the exact path with each peer; the lossy int4 row is ours too, and
            # its own ratio to llama.cpp is the line under the table
            ratio = "-" if key == "ours_int4" else f"{r['ours']['tokens_per_s'] / rate:.2f}x"
            rows.append([label, r[key]["tokens"], r[key]["seconds"], rate, ratio])
    a = r["greedy_agreement"]
    lines = [f"greedy tokens identical to HF one-at-a-time: {a['identical']} of {a['of']}"]
    if "head_screen" in r:
        h, same = r["head_screen"], r["head_screen"]["agreement_with_full_head"]
        unscreened = f", {h['unscreened_rows']} not offered to it" if "unscreened_rows" in h else ""
        lines.append(f"head screen: {h['screened_rows']} greedy rows screened, {h['full_rows']} scored in full "
                     f"(the screen unsure){unscreened}; tokens identical to --no-head-screen {same['identical']} of {same['of']}")
        if h.get("trial"):
            t = h["trial"]
            sizes = t.get("sizes") or [(t["rows"], t["screen_s"], t["full_s"])]
            verdict = ("dropped" if not t["kept"] else "kept" if t.get("up_to") is None
                       else f"kept for calls of up to {t['up_to']} rows")
            lines.append(f"head screen trial, {t.get('kind', 'int4')} screen / full layer ms per call: "
                         + ", ".join(f"{size} rows {s * 1000:.1f} / {f * 1000:.1f}" for size, s, f in sizes)
                         + f": {verdict}")
    if "drafts" in r:
        d, plain, alone = r["drafts"], r["drafts"]["no_drafts"], r["drafts"]["alone"]
        # runs before "drafts_again" was timed compared the first run, which also built the head screen
        with_s = d.get("drafts_again", r["ours"])["seconds"]
        lines.append(f"prompt-lookup drafts: {d['accepted']} of {d['drafted']} kept, {d['steps']} decode steps; "
                     f"without drafts {plain['seconds']:.1f} s against {with_s:.1f} s with them, screen built "
                     f"(drafts {plain['seconds'] / with_s:.2f}x), "
                     f"tokens identical {plain['agreement']['identical']} of {plain['agreement']['of']}; "
                     f"{alone['prompts']} prompts each alone {alone['seconds_with']:.1f} s against "
                     f"{alone['seconds_without']:.1f} s ({alone['seconds_without'] / alone['seconds_with']:.2f}x), "
                     f"identical {alone['agreement']['identical']} of {alone['agreement']['of']}")
    if "int4_ratio_vs_llama_cpp" in r:
        lines.append(f"int4 is {r['int4_ratio_vs_llama_cpp']:.2f}x llama.cpp")
    for key, label in (("ours_int4", "int4"), ("llama_cpp", "llama.cpp")):
        if key in r:
            g = r[key]["agreement_with_exact"]
            lines.append(f"{label} text identical to ours (exact) {g['identical']} of {g['of']}, "
                         f"first {g['mean_shared_prefix']:.0%} shared on average")
    return (f"GENERATION: {r['prompts']} prompts ({r['prompt_tokens']} prompt tokens), up to {r['max_new_tokens']} "
            f"new tokens, greedy, {r['threads']} threads\n"
            + table(["contender", "output tokens", "seconds", "tokens/s", "ours is"], rows)
            + "".join(f"\n  {line}" for line in lines))


def waves(lengths: list[int], *, slots: int, max_rows: int, max_new_tokens: int) -> list[list[int]]:
    """Indices (longest first) cut into fixed batches the key/value slots hold, rows x (longest +
    new tokens): how rows were decoded before continuous batching, each batch to its slowest row."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * (lengths[out[-1][0]] + max_new_tokens) <= slots:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def refill(engine: Engine, *, n: int, max_new_tokens: int, stop: list[str], repeats: int = 2) -> dict[str, Any]:
    """Continuous batching against fixed waves, on the bench prompts, greedy, rows ending at
    end-of-sequence or the first stop string: the same decoder, the same slots, timed alternately
    `repeats` times each (the best counts); outputs must be identical."""
    rows = [it.ids for it in prompts(engine, n)]
    window = stop_window(stop) if stop else 0

    def finished(row: int, ids: list[int]) -> bool:
        return ids[-1] in engine.eos_ids or (bool(stop) and any(
            s in engine.tokenizer.decode(ids[-window:], skip_special_tokens=True) for s in stop))

    def groups(index: list[int]) -> list[list[int]]:
        return [[index[k] for k in g] for g in plan_batches([len(rows[i]) for i in index],
                                                              token_budget=engine.token_budget,
                                                              max_batch_size=engine.max_batch_size)]

    def fixed() -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for wave in waves([len(r) for r in rows], slots=engine.decode_tokens, max_rows=engine.max_batch_size,
                          max_new_tokens=max_new_tokens):
            out.update(engine.decoder.run(rows, groups(wave), max_new_tokens=max_new_tokens, choose=None,
                                          finished=finished))
        return out

    def continuous() -> dict[int, list[int]]:
        return engine.decoder.run(rows, groups(list(range(len(rows)))), max_new_tokens=max_new_tokens, choose=None,
                                  finished=finished, slots=engine.decode_tokens, max_rows=engine.max_batch_size)

    times: dict[str, list[float]] = {"waves": [], "continuous": []}
    outs: dict[str, dict[int, list[int]]] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in (("waves", fixed), ("continuous", continuous)):
                run = timed(fn)
                times[name].append(run.seconds)
                outs[name] = run.value
    tokens = sum(len(v) for v in outs["continuous"].values())
    return {"prompts": len(rows), "max_new_tokens": max_new_tokens, "stop": stop, "output_tokens": tokens,
            "identical": sum(outs["waves"][i] == outs["continuous"][i] for i in range(len(rows))),
            "waves_seconds": times["waves"], "continuous_seconds": times["continuous"],
            "speedup": min(times["waves"]) / min(times["continuous"])}


def render_refill(r: dict[str, Any]) -> str:
    return (f"CONTINUOUS BATCHING: {r['prompts']} prompts, up to {r['max_new_tokens']} new tokens, greedy, "
            f"ending at end-of-sequence or {r['stop']}: {r['output_tokens']} output tokens\n"
            + table(["decode", "best s", "runs"], [
                ["fixed waves", min(r["waves_seconds"]), " ".join(f"{t:.1f}" for t in r["waves_seconds"])],
                ["continuous", min(r["continuous_seconds"]), " ".join(f"{t:.1f}" for t in r["continuous_seconds"])]])
            + f"\n  continuous is {r['speedup']:.2f}x fixed waves; identical outputs {r['identical']} of {r['prompts']}")


def generate_batches(engine: Engine, items: list[Tokenized], *, max_new_tokens: int,
                     grammar: Any = None) -> list[list[int]]:
    """Greedy tokens of `items` through `generate` batches, as the engine runs work the merged
    decoder does not take (`Engine.plan_generate` with merged=False; greedy rows choosing through
    `best_allowed`), under `grammar` (a `CompiledSchema`) if given."""
    out: list[list[int]] = [[] for _ in items]
    for batch, _ in engine.plan_generate(items, max_new_tokens=max_new_tokens, merged=False):
        rows = [items[i].ids for i in batch]
        got = engine._generate_batch(rows, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, stop=[],
                                     seeds=[0] * len(rows), grammar=grammar)
        for i, (ids, _) in zip(batch, got):
            out[i] = ids
    return out


def past_window(engine: Engine, *, n: int, max_new_tokens: int, shortest: int = 300, longest: int = 1000,
                repeats: int = 2) -> dict[str, Any]:
    """Prompts on both sides of the sliding window (`shortest` to `longest` tokens, so most rows
    cross it while decoding), greedy: the merged decoder, which holds rows of any length, against
    `generate` batches as the engine ran such prompts before it did (planned under `generate`'s
    key/value budget, greedy rows choosing through `best_allowed`), alternately `repeats` times each (the best
    counts); outputs must be identical."""
    items = prompts(engine, n, longest=longest, shortest=shortest)

    def merged() -> list[list[int]]:
        return [g.token_ids for g in engine.generate_tokenized(items, max_new_tokens=max_new_tokens)]

    def batches() -> list[list[int]]:
        return generate_batches(engine, items, max_new_tokens=max_new_tokens)

    times, outs = alternating({"generate": batches, "merged": merged}, repeats)
    window = getattr(engine.decoder.config, "sliding_window", None) if engine.decoder is not None else None
    lengths = [len(it.ids) for it in items]
    return {"prompts": len(items), "prompt_tokens": sum(lengths), "shortest": min(lengths), "longest": max(lengths),
            "sliding_window": window, "past_window": sum(k > (window or 10**9) for k in lengths),
            "crossing": sum(k <= (window or 10**9) < k + max_new_tokens for k in lengths),
            "max_new_tokens": max_new_tokens, "output_tokens": sum(map(len, outs["merged"])),
            "identical": sum(a == b for a, b in zip(outs["merged"], outs["generate"])),
            "generate_seconds": times["generate"], "merged_seconds": times["merged"],
            "speedup": min(times["generate"]) / min(times["merged"])}


def render_past_window(r: dict[str, Any]) -> str:
    return (f"PAST THE SLIDING WINDOW: {r['prompts']} prompts of {r['shortest']}-{r['longest']} tokens "
            f"({r['past_window']} past the {r['sliding_window']}-token window, {r['crossing']} crossing it while "
            f"decoding), {r['max_new_tokens']} new tokens, greedy: {r['output_tokens']} output tokens\n"
            + table(["decode", "best s", "runs"], [
                ["generate batches", min(r["generate_seconds"]), " ".join(f"{t:.1f}" for t in r["generate_seconds"])],
                ["merged decoder", min(r["merged_seconds"]), " ".join(f"{t:.1f}" for t in r["merged_seconds"])]])
            + f"\n  merged is {r['speedup']:.2f}x generate batches; identical outputs {r['identical']} of {r['prompts']}")
