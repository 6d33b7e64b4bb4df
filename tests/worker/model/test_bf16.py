"""CPU bf16 (`--quantize bf16`, lossy): the body's linear layers really run on bf16 weights, the
output layer stays fp32 with its word table, embeddings stay within cosine 0.9999 of fp32 yet are
changed, greedy generation works, and the mode's errors say what they mean."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from worker.engine import Engine, build_engine
from worker.model import bf16
from worker.model.device import Placement
from worker.model.loader import quantize_bf16_cpu
from worker.model.source import ModelSourceError
from worker.settings import Settings


@pytest.fixture(scope="module")
def bf16_engine(settings: Settings) -> Engine:
    return build_engine(Settings(device="cpu", cache_dir=settings.cache_dir, quantize="bf16"))


def test_bf16_puts_the_body_on_bf16_weights_and_keeps_the_output_layer(bf16_engine: Engine, engine: Engine) -> None:
    fp32_linears = [(n, m) for n, m in engine.model.body.named_modules() if isinstance(m, torch.nn.Linear)]
    modules = dict(bf16_engine.model.body.named_modules())
    # Every linear layer of the body is now a Bf16Linear holding the fp32 weight rounded to bf16
    assert fp32_linears and not any(isinstance(m, torch.nn.Linear) for m in modules.values())
    for name, exact in fp32_linears:
        layer = modules[name]
        assert isinstance(layer, bf16.Bf16Linear) and layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight, exact.weight.detach().to(torch.bfloat16))
    # A layer takes fp32 in and gives fp32 out, what linear over the bf16-rounded operands gives
    layer, exact = modules[fp32_linears[0][0]], fp32_linears[0][1]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = layer(x)
        rounded = torch.nn.functional.linear(x.to(torch.bfloat16).float(), layer.weight.float())
        assert out.dtype == torch.float32 and torch.allclose(out, rounded, rtol=1e-2, atol=1e-2)
        assert not torch.equal(out, exact(x))
    # The output layer stays the tied fp32 layer reading the exact int8 word table, as in fp32
    assert type(bf16_engine.decoder.head) is torch.nn.Linear and bf16_engine.decoder.head.weight.dtype == torch.float32
    assert bf16_engine.model.table is not None and torch.equal(bf16_engine.model.table.codes, engine.model.table.codes)
    # and the model's name says so, which keeps its results apart in the result cache
    assert bf16_engine.name == engine.name + "+bf16"


def test_bf16_embeddings_stay_within_the_exact_bound_yet_change(bf16_engine: Engine, engine: Engine,
                                                                docstrings: list[str]) -> None:
    texts = docstrings[:16]  # few: a CPU without bf16 units emulates it, far slower
    exact, lossy = engine.embed(texts).vectors, bf16_engine.embed(texts).vectors
    cosines = np.sum(exact * lossy, axis=1)
    # Within 0.9999 of the fp32 vectors (a wrong layer gives unrelated vectors), but really bf16
    assert cosines.min() >= 0.9999
    assert cosines.min() < 1 - 1e-7
    out = bf16_engine.generate(["The capital of France is"], max_new_tokens=8)[0]
    assert out.token_ids and out.text.strip()


def test_quantize_bf16_reaches_the_engine_from_the_command_line(bf16_engine: Engine, engine: Engine) -> None:
    texts = ["Pub/Sub delivers at least once.", "def add(a, b): return a + b"]
    result = run_cli("embed", *texts, "--quantize", "bf16", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    got = np.array([json.loads(line)["embedding"] for line in result.stdout.splitlines()], dtype=np.float32)
    # The bf16 engine's vectors (to float rounding across processes), not the exact ones
    assert got.shape == (2, 640)
    assert np.sum(got * bf16_engine.embed(texts).vectors, axis=1).min() > 1 - 1e-6
    assert not np.allclose(got, engine.embed(texts).vectors, rtol=0, atol=1e-6)


def test_bf16_is_refused_where_the_model_is_not_on_cpu(engine: Engine) -> None:
    on_gpu = dataclasses.replace(engine.model, placement=Placement(torch.device("cuda"), torch.bfloat16))
    with pytest.raises(ModelSourceError, match="quantize=bf16 is for CPU: on cuda the model already runs in bfloat16"):
        quantize_bf16_cpu(on_gpu)


def test_a_cpu_that_multiplies_bf16_no_faster_is_warned() -> None:
    assert bf16.slower_than_fp32_warning(1.0e-3, 2.0e-3) is None
    warning = bf16.slower_than_fp32_warning(30.0e-3, 3.0e-3)
    assert warning is not None and "no faster" in warning and "30.0 ms" in warning and "3.0 ms" in warning


def test_loading_bf16_warns_exactly_when_this_cpu_loses(settings: Settings, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe's verdict decides the warning: record what the real probe measured during the load
    from worker.model import int4

    measured: list[tuple[float, float]] = []
    real = int4.kernel_against_fp32

    def recording(**kwargs: object) -> tuple[float, float]:
        measured.append(real(**kwargs))
        return measured[-1]

    monkeypatch.setattr(int4, "kernel_against_fp32", recording)
    with caplog.at_level(logging.WARNING, logger="worker.model.loader"):
        build_engine(Settings(device="cpu", cache_dir=settings.cache_dir, quantize="bf16"))
    assert len(measured) == 1
    warned = any("--quantize bf16 is lossy and, on this CPU, no faster" in r.message for r in caplog.records)
    assert warned == (measured[0][0] >= measured[0][1])


def test_settings_take_bf16() -> None:
    assert Settings(quantize="bf16").quantize == "bf16"
    with pytest.raises(ValueError, match="quantize must be int8, int4, bf16 or unset"):
        Settings(quantize="fp8")
