"""The int8 opt-in (lossy, CPU): the body's linear layers really become int8, the output layer stays
fp32, answers stay close to fp32 ones and are kept apart from them in the result cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine import Engine, build_engine
from worker.model.loader import load_from_settings, quantize_weight_only
from worker.model.source import ModelSourceError
from worker.settings import Settings


@pytest.fixture(scope="module")
def int8_engine(settings: Settings) -> Engine:
    return build_engine(Settings(device="cpu", cache_dir=settings.cache_dir, quantize="int8"))


def test_int8_quantizes_the_body_and_keeps_the_output_layer(int8_engine: Engine, engine: Engine) -> None:
    linears = [m for m in int8_engine.model.body.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in int8_engine.model.body.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    # Every linear layer of the body is int8, none is left fp32
    assert not linears and len(quantized) == sum(isinstance(m, torch.nn.Linear) for m in engine.model.body.modules())
    # The output layer (tied to the embedding) stays fp32, so the blocked greedy head still applies,
    # and it and the input embedding read the word table's exact int8 blocks, as the fp32 engine's do
    # (sampling's full logits included), not the fp32 table's checkpoint pages
    assert isinstance(int8_engine.decoder.head, torch.nn.Linear)
    table = int8_engine.model.table
    assert table is not None and int8_engine.decoder.table is table and int8_engine.decoder.head.int8_table is table
    assert torch.equal(table.codes, engine.model.table.codes)
    hidden = torch.randn(3, table.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = int8_engine.decoder.head(hidden)
        assert torch.equal(logits, engine.decoder.head(hidden))
        assert torch.allclose(logits[:, :4096], torch.nn.functional.linear(hidden, table.block(0, 4096)), atol=1e-4)
    sampled = int8_engine.generate(["Once upon a time"], max_new_tokens=4, temperature=0.9, seed=3)[0]
    assert sampled.token_ids
    # and the model's name says it is quantized, which keeps its results apart in the cache
    assert int8_engine.name == engine.name + "+int8" and int8_engine.name != engine.name


def test_int8_answers_are_close_to_fp32_but_not_identical(int8_engine: Engine, engine: Engine,
                                                          docstrings: list[str]) -> None:
    texts = docstrings[:24]
    exact, lossy = engine.embed(texts).vectors, int8_engine.embed(texts).vectors
    cosines = np.sum(exact * lossy, axis=1)
    # Close (a broken quantization gives unrelated vectors, cosine far below), yet really changed
    assert cosines.mean() > 0.9 and cosines.min() > 0.7
    assert cosines.min() < 0.9999
    out = int8_engine.generate(["The capital of France is"], max_new_tokens=8)[0]
    assert out.token_ids and out.text.strip()


def test_quantize_accepts_only_known_modes() -> None:
    assert Settings(quantize="int4").quantize == "int4"
    with pytest.raises(ValueError, match="quantize must be int8, int4, bf16 or unset"):
        Settings(quantize="int2")


@pytest.mark.slow
def test_weight_only_int8_quantizes_the_body_through_torchao(settings: Settings, engine: Engine,
                                                             docstrings: list[str], torchao: object) -> None:
    """The CUDA path's wiring (which layers, the name, the closeness), run on CPU: torchao's int8
    weight-only layers work on any device (slower than fp32 here, so the CPU default stays dynamic int8)."""
    from torchao.quantization import Int8Tensor

    loaded = quantize_weight_only(load_from_settings(Settings(device="cpu", cache_dir=settings.cache_dir)), "int8")
    lossy = Engine(loaded, max_input_tokens=engine.max_input_tokens, token_budget=engine.token_budget,
                   max_batch_size=engine.max_batch_size, max_new_tokens=engine.max_new_tokens)
    linears = [m for m in lossy.model.body.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears)
    # the output layer stays a plain tensor, so the blocked greedy head still applies
    assert not isinstance(lossy.decoder.head.weight, Int8Tensor)
    assert lossy.name == engine.name + "+int8"
    texts = docstrings[:16]
    cosines = np.sum(engine.embed(texts).vectors * lossy.embed(texts).vectors, axis=1)
    # weight-only per-row int8 keeps activations exact: far closer than dynamic int8, yet changed
    assert cosines.min() > 0.99 and cosines.min() < 0.999999


def test_weight_only_modes_name_what_they_need(engine: Engine) -> None:
    # int4's tinygemm kernel takes bf16 weights only: an fp32 model is refused before torchao runs
    with pytest.raises(ModelSourceError, match="int4 needs bf16 weights"):
        quantize_weight_only(engine.model, "int4")
    with pytest.raises(ModelSourceError, match="quantize must be int8 or int4"):
        quantize_weight_only(engine.model, "int2")
