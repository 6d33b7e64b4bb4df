"""`--compile`: the embedding forward pass through torch.compile, compiled at startup for every
shape regime, giving the eager vectors (to float rounding), with the body's linear layers on
PyTorch's `linear` or on oneDNN's. A small Gemma 3 with random weights and
the real tokenizer stands in for the 270M model: compiling that takes minutes on two cores, and
what is tested here (the swap, the shapes, the agreement) does not depend on the size."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Gemma3ForCausalLM

from worker.engine import Engine
from worker.model import onednn
from worker.model.loader import LoadedModel, fuse_norms
from worker.settings import Settings


@pytest.fixture(scope="module", params=["linear", "onednn"])
def small_engine(engine: Engine, request: pytest.FixtureRequest) -> Engine:
    """The small model with its linear layers on PyTorch's `linear`, or switched to oneDNN's as the
    loader switches them where its probe finds oneDNN faster (worker/model/onednn.py)."""
    config = engine.model.lm.config.get_text_config().__class__.from_dict(engine.model.lm.config.get_text_config().to_dict())
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "head_dim": 32, "layer_types": ["sliding_attention", "full_attention"],
                   "sliding_window": 48})
    torch.manual_seed(0)
    lm = Gemma3ForCausalLM(config).eval()
    fuse_norms(lm)
    if request.param == "onednn":
        assert onednn.use_onednn(lm.get_decoder()) == 2 * 7
    model = LoadedModel(name="small-random-gemma3", body=lm.get_decoder(), lm=lm, tokenizer=engine.tokenizer,
                        placement=engine.model.placement, max_positions=512, hidden_size=64, load_seconds=0.0)
    return Engine(model, max_input_tokens=200, token_budget=1024, max_batch_size=64, max_new_tokens=16)


def test_compiled_embedding_matches_eager_and_compiles_only_at_startup(small_engine: Engine,
                                                                       docstrings: list[str]) -> None:
    texts = docstrings[:40] + ["short", "a b"]
    eager = small_engine.embed(texts, truncate=True).vectors
    # When compiled (as build_engine does for --compile)
    seconds = small_engine.compile_embedding()
    compiled_graphs = counters["stats"]["unique_graphs"]
    assert seconds > 0 and compiled_graphs > 0
    assert small_engine._compiled_forward is not None
    # Then batches of every shape (one row, many rows, short, past the sliding window) use what was
    # compiled at startup: no compiling while serving
    out = small_engine.embed(texts, truncate=True).vectors
    alone = small_engine.embed([texts[0]], truncate=True).vectors
    assert counters["stats"]["unique_graphs"] == compiled_graphs
    # and the vectors are the eager ones, to float rounding
    assert np.min(np.sum(out * eager, axis=1)) > 0.9999
    assert float(np.sum(alone[0] * eager[0])) > 0.9999


def test_compile_and_quantize_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="compile and quantize"):
        Settings(compile=True, quantize="int8")
    assert dataclasses.replace(Settings(), compile=True).compile


def test_reembed_children_get_compile_and_quantize_from_the_parent() -> None:
    from cli import settings_env

    env = settings_env(Settings(compile=True))
    assert env["GEMMA_BATCH_COMPILE"] == "true" and "GEMMA_BATCH_QUANTIZE" not in env
    assert settings_env(Settings(quantize="int8"))["GEMMA_BATCH_QUANTIZE"] == "int8"
    assert "GEMMA_BATCH_COMPILE" not in settings_env(Settings())
