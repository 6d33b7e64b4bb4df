"""The GPU benchmark's own logic, on CPU (CI has no GPU; its figures come from `python -m bench.gpu`
on a machine with one, docs/PERFORMANCE.md): the floors it divides by, the bytes it counts, the
random-weights model it builds, and the table it prints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.gpu import decode_floor, random_model, render, sdpa_choice, weight_bytes
from worker.engine import Engine, build_engine
from worker.model.source import prepare_model
from worker.settings import Settings

RESULTS = Path(__file__).parents[2] / "bench" / "results"


def test_weight_bytes_counts_quantized_weights_by_their_packed_storage(torchao: object) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Embedding(10, 256))
    assert weight_bytes(model) == (256 * 512 + 10 * 256) * 4
    quantize_(model, Int8WeightOnlyConfig(version=2, set_inductor_config=False))
    # one byte per int8 value plus a few bytes per output row (scale, zero point); the embedding untouched
    linear = weight_bytes(model) - 10 * 256 * 4
    assert 256 * 512 < linear <= 256 * 512 + 512 * 8


def test_decode_floor_reads_each_weight_and_the_cache_once_per_step(engine: Engine) -> None:
    config = engine.model.body.config
    window, kinds = config.sliding_window, config.layer_types
    per_position = 2 * config.num_key_value_heads * config.head_dim * 4  # fp32 keys and values
    full = sum(kind == "full_attention" for kind in kinds)
    bandwidth = 1e12  # counted read + write, so reads run at half of it
    one_step = decode_floor(engine, [window + 100], 1, bandwidth, float("inf"))
    longer = decode_floor(engine, [window + 200], 1, bandwidth, float("inf"))
    # Past the window only the full-attention layers read the extra 100 positions
    assert longer - one_step == pytest.approx(100 * full * per_position / (bandwidth / 2))
    # Within the window every layer does; the weights are read once per step whatever the rows
    short = decode_floor(engine, [10], 1, bandwidth, float("inf"))
    assert short == pytest.approx((weight_bytes(engine.model.lm) + 10 * len(kinds) * per_position) / (bandwidth / 2))
    two_steps = decode_floor(engine, [10], 2, bandwidth, float("inf"))
    assert two_steps - short == pytest.approx((weight_bytes(engine.model.lm) + 11 * len(kinds) * per_position)
                                              / (bandwidth / 2))


@pytest.mark.slow
def test_random_weights_model_loads_like_any_local_checkpoint(settings: Settings, tmp_path: Path) -> None:
    # Given a directory with the real model's config (shrunk, to keep the test quick) and tokenizer
    source = prepare_model(settings.model, settings.cache_dir).path
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(num_hidden_layers=2, layer_types=config["layer_types"][:2], hidden_size=64,
                  intermediate_size=128, head_dim=32)
    (config_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (config_dir / name).write_bytes((source / name).read_bytes())
    # When the benchmark builds its random-weights model from it, twice
    first = random_model(config_dir, tmp_path / "a")
    second = random_model(config_dir, tmp_path / "b")
    # Then the engine loads it from disk as it would any model directory, and the weights are seeded
    engines = [build_engine(Settings(model=str(p), device="cpu", cache_dir=tmp_path / "cache")) for p in (first, second)]
    assert engines[0].width == 64 and len(engines[0].model.body.layers) == 2
    vectors = [e.embed(["def f(): return 1", "a longer sentence about queues"]).vectors for e in engines]
    assert vectors[0].shape == (2, 64) and np.allclose(vectors[0], vectors[1])


def test_render_prints_the_cpu_vs_gpu_table_from_a_recorded_run() -> None:
    results = json.loads((RESULTS / "gpu-h200-20261127-run2.json").read_text())
    text = render(results)
    e, g, c = results["embedding"], results["generation"], results["cpu"]
    cpu_row = next(line for line in text.splitlines() if line.startswith("embed "))
    assert f"{e['ours']['tokens_per_s'] / c['embed_tokens_per_s']:.1f}x" in cpu_row
    gen_row = next(line for line in text.splitlines() if line.startswith("generate "))
    assert f"{g['ours']['tokens_per_s'] / c['generate_tokens_per_s']:.1f}x" in gen_row
    assert "random" in text.splitlines()[0] and "int4" in text and "COMPILE" in text


def test_sdpa_choice_names_the_backend_attention_picks_for_the_models_heads(engine: Engine) -> None:
    # On this CPU both calls go to a fused kernel; the names are the SDPBackend members, so a run on
    # a GPU reads "CUDNN_ATTENTION", "FLASH_ATTENTION" or "EFFICIENT_ATTENTION" in the same place
    got = sdpa_choice(engine, rows=2, width=16)
    members = set(torch.nn.attention.SDPBackend.__members__)
    assert set(got) == {"causal", "masked"} and set(got.values()) <= members - {"ERROR"}


def test_coldprofile_writes_a_profile_of_the_build_and_of_each_call(settings: Settings, tmp_path: Path) -> None:
    from bench import coldprofile

    model = prepare_model(settings.model, settings.cache_dir).path
    coldprofile.main([str(model), "--device", "cpu", "--cache-dir", str(settings.cache_dir), "--texts", "4",
                      "--prompts", "1", "--max-new-tokens", "4", "--out", str(tmp_path)])
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert set(files) == {"build.txt", "embed0.txt", "embed1.txt", "gen0.txt", "gen1.txt"}
    # each names its part and its seconds, and the profile reaches the engine's own code
    assert files["build.txt"].startswith("build: ") and "build_engine" in files["build.txt"]
    assert "embed_pass" in files["embed0.txt"] and "generate_tokenized" in files["gen1.txt"]
