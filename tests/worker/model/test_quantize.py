"""The int8 opt-in (lossy, CPU): the body's linear layers really become int8, the output layer stays
fp32, answers stay close to fp32 ones and are kept apart from them in the result cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine import Engine, build_engine
from worker.settings import Settings


@pytest.fixture(scope="module")
def int8_engine(settings: Settings) -> Engine:
    return build_engine(Settings(device="cpu", cache_dir=settings.cache_dir, quantize="int8"))


def test_int8_quantizes_the_body_and_keeps_the_output_layer(int8_engine: Engine, engine: Engine) -> None:
    linears = [m for m in int8_engine.model.body.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in int8_engine.model.body.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    # Every linear layer of the body is int8, none is left fp32
    assert not linears and len(quantized) == sum(isinstance(m, torch.nn.Linear) for m in engine.model.body.modules())
    # The output layer (tied to the embedding) stays fp32, so the blocked greedy head still applies
    assert isinstance(int8_engine.decoder.head, torch.nn.Linear)
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
    with pytest.raises(ValueError, match="quantize must be int8"):
        Settings(quantize="int4")
