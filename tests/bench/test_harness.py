"""The benchmark harness's own logic (the measurements themselves are `make bench`, never tests)."""
from __future__ import annotations

import pytest

from bench.__main__ import targets
from bench.common import mixed_length, table


def test_mixed_length_steps_evenly_from_short_to_the_longest_allowed() -> None:
    # Given a corpus skewed to short texts (most 10-20 tokens, few long ones)
    lengths = [10 + i % 10 for i in range(500)] + [50, 120, 200, 260, 330, 399, 401, 900]
    picked = mixed_length(lengths, 6, longest=400)
    chosen = sorted(lengths[i] for i in picked)
    # Then the picks span the range evenly (not the corpus's skew), never past the limit, no repeats
    assert chosen[0] == 10 and chosen[-1] == 399 and len(set(picked)) == 6
    assert all(c <= 400 for c in chosen)
    assert sum(c > 100 for c in chosen) >= 3
    assert picked == sorted(picked)  # corpus order


def test_targets_report_each_goal_with_its_direction() -> None:
    results = {"generation": {"ratio_vs_llama_cpp": 1.5, "ratio_vs_hf_one_at_a_time": 7.0},
               "embedding": {"ratio_vs_sentence_transformers": 2.0, "compute_floor": {"fraction_reached": 0.7}},
               "pipeline": {"efficiency": 0.95, "cold_start_s": 12.0, "worker_peak_rss_bytes": 2.0e9}}
    verdicts = {row[0]: row[3] for row in targets(results)}
    assert verdicts == {
        "generation vs llama-cpp-python sequential": "NO", "generation vs HF one at a time": "yes",
        "embedding vs sentence-transformers": "yes", "embedding share of compute floor": "NO",
        "pipeline efficiency": "yes", "cold start, s": "NO", "worker peak RSS, GB": "yes"}
    # sections not run are left out rather than reported as failures
    assert targets({"pipeline": {"efficiency": 0.5}}) == [["pipeline efficiency", "0.50", ">= 0.90", "NO"]]


def test_table_aligns_columns() -> None:
    lines = table(["a", "bb"], [["x", 1.23456], ["yyyy", 12345.6]]).splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[2].endswith("1.23") and lines[3].endswith("12,345.6")


def test_attention_flops_count_each_visible_position_within_the_sliding_window(engine) -> None:
    from bench.common import attention_flops

    # Given the embedded Gemma 3 270M: 18 layers, 4 query heads of 256, sliding layers see 512 positions
    config = engine.model.body.config
    kinds = list(config.layer_types)
    width = config.head_dim * config.num_attention_heads
    assert (len(kinds), width, config.sliding_window) == (18, 1024, 512)
    # When texts within and past the window are counted / Then each (token, visible position) pair
    # costs 4 x width FLOPs per layer, a sliding layer seeing at most its window
    for n in (1, 37, 700):
        pairs = sum(min(p, 512) if kind == "sliding_attention" else p for kind in kinds for p in range(1, n + 1))
        assert attention_flops(engine, [n]) == 4.0 * width * pairs
    assert attention_flops(engine, [37, 700]) == attention_flops(engine, [37]) + attention_flops(engine, [700])


def test_waves_cut_rows_longest_first_by_the_key_value_slots() -> None:
    from bench.generation import waves

    # Given prompts of 100, 10, 60 and 50 tokens, 20 new tokens each, and 300 slots
    cut = waves([100, 10, 60, 50], slots=300, max_rows=64, max_new_tokens=20)
    # Then each wave is longest first and holds rows x (its longest + 20) <= 300: 2 x 120 (a third
    # row would make 360), then 2 x 70
    assert cut == [[0, 2], [3, 1]]
    assert waves([100, 10, 60, 50], slots=300, max_rows=1, max_new_tokens=20) == [[0], [2], [3], [1]]


def test_the_lossy_int4_ratio_is_a_row_of_its_own() -> None:
    rows = targets({"generation": {"ratio_vs_llama_cpp": 1.3, "int4_ratio_vs_llama_cpp": 2.4}})
    assert [r[0] for r in rows] == ["generation vs llama-cpp-python sequential",
                                    "generation vs llama-cpp-python, --quantize int4 (lossy)"]
    assert [r[3] for r in rows] == ["NO", "yes"]


def test_the_lossy_bf16_share_of_the_floor_is_a_row_of_its_own_and_rendered() -> None:
    from bench.quantized import render

    r = {"mode": "bf16", "texts": 500, "prompts": 16, "max_new_tokens": 64,
         "embed_seconds": {"fp32": 60.0, "bf16": 40.0}, "embed_speedup": 1.5, "embed_floor_seconds": 36.0,
         "embed_share_of_floor": {"fp32": 0.6, "bf16": 0.9},
         "embed_cosine": {"mean": 0.99999, "min": 0.99993, "p10": 0.99998},
         "generate_tokens_per_s": {"fp32": 40.0, "bf16": 46.0}, "generate_speedup": 1.15,
         "greedy_identical": 15, "greedy_mean_shared_prefix": 0.96}
    rows = targets({"embedding": {"compute_floor": {"fraction_reached": 0.7}}, "bf16": r})
    assert [(row[0], row[3]) for row in rows if "floor" in row[0]] == [
        ("embedding share of compute floor", "NO"),
        ("embedding share of compute floor, --quantize bf16 (lossy; 500 texts)", "yes")]
    text = render(r)
    assert "BF16 (--quantize bf16, lossy)" in text and "embed, share of the fp32 compute floor" in text
    assert "60%" in text and "90%" in text and "min 0.9999;" in text and "identical 15 of 16" in text


def test_text_agreement_counts_identical_outputs_and_the_shared_share() -> None:
    from bench.generation import text_agreement

    got = text_agreement(["abcd", "abXY", "", "same"], ["abcd", "abcd", "abcd", "same"])
    # identical: 2 of 4; shared prefix of each reference: 4/4, 2/4, 0/4, 4/4
    assert got == {"identical": 2, "of": 4, "mean_shared_prefix": (1 + 0.5 + 0 + 1) / 4}


def test_the_memory_probe_reports_a_fresh_process_peak() -> None:
    from bench import rss

    got = rss.measure("int4", work="embed", texts=8, calls=2)
    # a fresh interpreter that loaded the real model: hundreds of MB at least, and the peak after the
    # work is never below the peak after building
    assert got["quantize"] == "int4" and got["work"] == "embed" and got["build_s"] > 0
    assert 300e6 < got["peak_rss_after_build_bytes"] <= got["peak_rss_bytes"] < 2.5e9  # measured 1.8 GB
    # spawn to ready covers the interpreter's start and the warm-up as well as the load; the work ran twice
    assert got["spawn_to_ready_s"] > got["build_s"] + got["warm_up_s"] and got["warm_up_s"] > 0
    assert len(got["calls_s"]) == 2 and min(got["calls_s"]) > 0 and got["device"] == "cpu"


def test_the_memory_probe_generates_under_the_key_value_budget_it_is_given() -> None:
    import torch

    from bench import rss
    from worker.engine import default_decode_tokens

    # A budget of one row of the longest of 3 prompts (at most 400 tokens) and its 64 new tokens
    got = rss.measure(None, work="generate", prompts=3, decode_tokens=600)
    # reaches the engine, not the default, and the generation still runs
    assert got["decode_tokens"] == 600 != default_decode_tokens(torch.device("cpu"))
    assert got["work"] == "generate" and len(got["calls_s"]) == 1 and got["calls_s"][0] > 0
    assert got["peak_rss_after_build_bytes"] <= got["peak_rss_bytes"]


def test_the_generation_table_compares_peers_with_the_exact_path_and_int4_with_llama_cpp() -> None:
    from bench.generation import render

    def row(tokens: int, seconds: float) -> dict[str, float]:
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    agreement = {"identical": 1, "of": 2, "mean_shared_prefix": 0.5}
    r = {"prompts": 2, "prompt_tokens": 10, "max_new_tokens": 4, "threads": 2,
         "ours": row(8, 2.0), "ours_int4": {**row(8, 1.0), "agreement_with_exact": agreement},
         "hf_one_at_a_time": row(8, 8.0), "llama_cpp": {**row(8, 4.0), "agreement_with_exact": agreement},
         "greedy_agreement": {"identical": 2, "of": 2}, "int4_ratio_vs_llama_cpp": 4.0,
         "ours_full_head": row(8, 3.0),
         "head_screen": {"screened_rows": 7, "full_rows": 1, "unscreened_rows": 3, "agreement_with_full_head": {"identical": 2, "of": 2},
                         "trial": {"rows": 32, "screen_s": 0.0455, "full_s": 0.129, "kept": True}}}
    lines = render(r).splitlines()
    int4 = next(line for line in lines if line.startswith("ours, --quantize int4"))
    llama = next(line for line in lines if line.startswith("llama-cpp-python"))
    # the exact path against llama.cpp (4 / 2 tokens/s), never exact against its own lossy mode
    assert llama.rstrip().endswith("2.00x") and int4.rstrip().endswith("-")
    assert "int4 is 4.00x llama.cpp" in render(r)
    # the same engine with the full fp32 output layer, and how the screen answered
    full = next(line for line in lines if line.startswith("ours, --no-head-screen"))
    assert full.rstrip().endswith("1.50x")
    assert ("head screen: 7 greedy rows screened, 1 scored in full (the screen unsure), 3 not offered to it; "
            "tokens identical to --no-head-screen 2 of 2") in render(r)
    # and the screen's trial: an older record (one size), and one timed per size, kept for few rows
    assert "head screen trial, int4 screen / full layer ms per call: 32 rows 45.5 / 129.0: kept" in render(r)
    r["head_screen"]["trial"] = {"rows": 32, "screen_s": 0.2, "full_s": 0.15, "kept": True, "up_to": 8,
                                 "sizes": [[1, 0.015, 0.05], [8, 0.06, 0.12], [32, 0.2, 0.15]]}
    assert ("head screen trial, int4 screen / full layer ms per call: 1 rows 15.0 / 50.0, 8 rows 60.0 / 120.0, "
            "32 rows 200.0 / 150.0: kept for calls of up to 8 rows") in render(r)


def test_section_lists_keep_their_order_and_name_what_is_unknown() -> None:
    from bench.common import chosen_sections
    from bench.gpu import SECTIONS

    assert chosen_sections(" cold_start,embedding ,", SECTIONS) == ["cold_start", "embedding"]
    with pytest.raises(ValueError, match="unknown section\\(s\\) bogus; choose from embedding"):
        chosen_sections("embedding,bogus", SECTIONS)


def test_the_naive_baseline_runs_on_the_checkpoint_as_transformers_loads_it(engine, settings) -> None:
    from bench.generation import prompts, run_hf_one_at_a_time, stock_model
    from worker.model.source import prepare_model

    def replaced_forwards(lm) -> list[str]:
        return [name for name, m in lm.named_modules() if "forward" in vars(m)]

    # Given the engine (whose model's layers it changed: fused norms, oneDNN linear layers, the
    # word table's output layer) / When the naive baseline's model is loaded
    stock = stock_model(engine, prepare_model(settings.model, settings.cache_dir).path)
    # Then it is a model of its own, with transformers' own forwards everywhere
    assert stock is not engine.model.lm and replaced_forwards(engine.model.lm)
    assert replaced_forwards(stock) == []
    assert stock.config._attn_implementation == "sdpa" and stock.dtype == engine.model.placement.dtype
    # and its greedy tokens, one prompt at a time, are the engine's
    items = prompts(engine, 2)
    naive, seconds = run_hf_one_at_a_time(stock, engine, items, 8)
    assert seconds > 0 and naive == [g.token_ids for g in engine.generate_tokenized(items, max_new_tokens=8)]


def test_the_generation_section_times_the_head_screen_against_the_full_layer(engine, settings) -> None:
    from bench.generation import measure, render
    from worker.model.source import prepare_model

    # Given the real engine with its head screen built (as a worker's is once greedy work earned it
    # and it beat the full layer), a few prompts and no llama.cpp / When the generation section runs
    engine.decoder.ensure_screen()
    got = measure(engine, n=4, max_new_tokens=8, gguf=None, naive_every=4,
                  model_dir=prepare_model(settings.model, settings.cache_dir).path)
    # Then the naive baseline (a stock model) gave our tokens on its prompt
    assert got["hf_one_at_a_time"]["model"] == "stock" and got["greedy_agreement"]["identical"] == 1
    # Then the same engine ran again with every word scored in fp32, with the same tokens,
    screen = got["head_screen"]
    assert got["ours_full_head"]["tokens"] == got["ours"]["tokens"] and got["ours_full_head"]["seconds"] > 0
    assert screen["agreement_with_full_head"] == {"identical": 4, "of": 4,
                                                  "shortest_common_prefix": screen["agreement_with_full_head"]["shortest_common_prefix"]}
    # and the timed run's greedy rows were counted: one per prompt for the first token, one per step after
    assert screen["screened_rows"] + screen["full_rows"] + screen["unscreened_rows"] >= got["ours"]["tokens"]
    assert screen["screened_rows"] > 0
    assert engine.decoder.screen_wanted and "ours, --no-head-screen" in render(got)
    # and again without prompt-lookup drafts, on all prompts and on a few alone: the same tokens
    drafts = got["drafts"]
    assert drafts["no_drafts"]["agreement"]["identical"] == 4 and drafts["alone"]["agreement"]["identical"] == 4
    # and with drafts again once the screen is built, the comparison the drafts' ratio is taken from
    assert drafts["drafts_again"]["agreement"]["identical"] == 4 and drafts["drafts_again"]["seconds"] > 0
    assert drafts["steps"] > 0 and drafts["drafted"] >= drafts["accepted"] >= 0
    assert engine.decoder.draft_tokens > 0 and "prompt-lookup drafts:" in render(got)
    assert f"against {drafts['drafts_again']['seconds']:.1f} s with them, screen built" in render(got)


def test_the_window_section_times_prompts_past_the_window_both_ways_with_the_same_tokens(engine) -> None:
    from bench.generation import past_window, render_past_window

    # Given real prompts from just inside the 512-token sliding window to past it / When the section runs
    got = past_window(engine, n=3, max_new_tokens=40, shortest=480, longest=700, repeats=1)
    # Then both ways ran every prompt, one crossing the window while decoding and one past it,
    # with the same tokens, and the ratio is the two timings'
    assert (got["prompts"], got["sliding_window"]) == (3, 512) and got["past_window"] >= 1 and got["crossing"] >= 1
    assert got["identical"] == 3 and got["output_tokens"] > 3
    assert got["speedup"] == got["generate_seconds"][0] / got["merged_seconds"][0]
    assert "merged is" in render_past_window(got) and "identical outputs 3 of 3" in render_past_window(got)


def test_the_constrained_routes_are_timed_alternately_with_the_same_tokens(engine) -> None:
    from bench.constrained import prompts, routes

    # Given two graph prompts / When the constrained routes are compared once each
    got = routes(engine, prompts(2), max_tokens=24, repeats=1)
    # Then the merged decoder and `generate` batches gave the same tokens, and the ratio is their timings'
    assert (got["rows"], got["identical"]) == (2, 2) and got["tokens"] > 2
    assert got["speedup"] == round(got["generate_seconds"][0] / got["merged_seconds"][0], 3)
    assert got["merged_drafts"]["steps"] > 0


def test_the_head_section_times_each_screen_against_the_full_layer_on_real_decode_states(engine) -> None:
    from bench.head import measure, render

    # Given the real engine / When the head section runs on the states of 3 prompts x 4 tokens,
    # at 1 and 4 rows per call
    got = measure(engine, n=3, steps=4, rows=(1, 4), calls=2, rounds=1)
    # Then it captured one state per greedy row the decoder asked for, and left the decoder as it was
    assert got["states"] == 3 * 4 and "best" not in vars(engine.decoder)
    # and timed the full layer and every screen (this CPU has the int4 kernel and fbgemm's int8) at each size
    assert set(got["ms_per_call"]) == {"1", "4"}
    assert all(set(ms) == {"full", "full, linear", "bf16", "int8", "int4", "logits, table", "logits, fp32 weight"}
               and min(ms.values()) > 0 for ms in got["ms_per_call"].values())
    # and every row a screen vouched for got the full layer's token: 2 calls of 1 row and 2 of 4
    for kind in ("bf16", "int8", "int4"):
        record = got["screens"][kind]
        assert record["answered"] == 10 and record["same_as_full"] == record["vouched"] >= 8
    text = render(got)
    assert got["choose_kind"] in ("bf16", "int8", "int4") and "bf16 is" in text and "int8 screen: built in" in text
    assert got["int8_speedup_probe"] > 0 and "int8 probe" in text
    assert "FULL LOGITS" in text and got["linear_same_tokens"] == got["linear_calls"] == 4


def test_cold_starts_alternate_between_trees_so_drift_falls_on_both() -> None:
    from pathlib import Path

    from bench.coldstart import order

    a, b = Path("a"), Path("b")
    assert order([a, b], 3) == [a, b, b, a, a, b]
    assert order([a], 2) == [a, a]


@pytest.mark.slow
@pytest.mark.emulator
def test_cold_start_times_a_real_worker_from_spawn_to_pulling() -> None:
    from bench.coldstart import REPO, main

    # Given this checkout / When one worker is started against the emulator and storage server
    got = main(["--runs", "1"])
    # Then one spawn-to-pulling time is reported for it, that of a process that loaded the model
    assert list(got) == [str(REPO)] and len(got[str(REPO)]) == 1
    assert 1.0 < got[str(REPO)][0] < 300
