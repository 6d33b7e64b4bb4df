"""The body's fp32 linear layers through oneDNN (worker/model/onednn.py): the loader switches them
exactly when its probe finds oneDNN faster on this CPU, oneDNN's `linear` is PyTorch's to fp32
rounding, and embeddings and greedy tokens are the same through either kernel."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from worker.engine import Engine
from worker.model import onednn
from worker.model.bf16 import Bf16Linear


@contextlib.contextmanager
def _kernel(engine: Engine, *, use: bool) -> Iterator[None]:
    """The engine's body on oneDNN (`use`) or on PyTorch's `linear`, then back as the loader left it."""
    root, head = engine.model.lm, engine.model.lm.get_output_embeddings()
    onednn.use_default(root)
    if use:
        onednn.use_onednn(root, skip=head)
    try:
        yield
    finally:
        onednn.use_default(root)
        if engine.model.linear.used:
            onednn.use_onednn(root, skip=head)


def test_this_pytorch_has_onednn_and_its_linear_is_pytorchs_to_rounding() -> None:
    # Given the CPU build of PyTorch the project installs
    assert onednn.available()
    generator = torch.Generator().manual_seed(0)
    for shape, batch in (((2048, 640), (1,)), ((640, 1024), (3, 17)), ((256, 640), (116,))):
        weight = torch.randn(shape, generator=generator) * 0.05
        bias = torch.randn(shape[0], generator=generator)
        x = torch.randn(*batch, shape[1], generator=generator)
        for b in (None, bias):
            # When a layer's shape is multiplied through oneDNN and through `linear`, any leading dimensions
            got, want = onednn.linear(x, weight, b), torch.nn.functional.linear(x, weight, b)
            # Then the shapes agree and the values to fp32 rounding
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_loader_switched_the_body_exactly_when_its_probe_found_onednn_faster(engine: Engine) -> None:
    choice = engine.model.linear
    root, head = engine.model.lm, engine.model.lm.get_output_embeddings()
    linears = [m for m in root.modules() if type(m) is torch.nn.Linear]
    # Given the loader's probe of both kernels on the model's own layer shapes
    assert choice.onednn_s > 0 and choice.default_s > 0
    # Then it used oneDNN exactly when oneDNN was FASTER, for every linear layer but the output layer
    assert choice.used == (choice.default_s >= onednn.FASTER * choice.onednn_s)
    switched = [m for m in linears if onednn.runs_onednn(m)]
    body = [m for m in linears if m is not head]
    assert switched == (body if choice.used else []) and choice.layers == len(switched)
    assert head not in switched and len(body) == 7 * engine.model.lm.config.get_text_config().num_hidden_layers


def test_embeddings_and_greedy_tokens_are_the_same_through_either_kernel(engine: Engine,
                                                                         docstrings: list[str]) -> None:
    # Given real texts and prompts of mixed length
    texts = docstrings[:24]
    prompts = [f"Summarise this documentation:\n\n{d}" for d in docstrings[24:32]]
    results = {}
    for use in (True, False):
        # When each is embedded and generated for greedily through oneDNN and through `linear`
        with _kernel(engine, use=use):
            vectors = engine.embed(texts, truncate=True).vectors
            tokens = [g.token_ids for g in engine.generate(prompts, max_new_tokens=24)]
        results[use] = vectors, tokens
    (a, tokens_a), (b, tokens_b) = results[True], results[False]
    # Then the vectors agree to fp32 rounding and the greedy tokens are identical
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert float(cosines.min()) > 0.99999
    assert tokens_a == tokens_b
    # and the engine's body is left on the kernel the loader chose
    assert any(onednn.runs_onednn(m) for m in engine.model.lm.modules()) == engine.model.linear.used


def test_only_plain_fp32_linear_layers_are_switched_and_switching_back_undoes_it() -> None:
    # Given a model with an fp32 linear layer, a bf16 one, a bf16-weight layer of the lossy mode and
    # an output layer to skip
    fp32, low, head = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32).to(torch.bfloat16), torch.nn.Linear(32, 8)
    model = torch.nn.Sequential(fp32, low, Bf16Linear(torch.nn.Linear(32, 32)), head)
    x = torch.randn(5, 64)
    want = fp32(x)
    # When switched to oneDNN, skipping the output layer
    assert onednn.use_onednn(model, skip=head) == 1
    # Then only the fp32 layer runs through it, with the same output to rounding
    assert onednn.runs_onednn(fp32) and not any("forward" in vars(m) for m in (low, head))
    assert torch.allclose(fp32(x), want, rtol=1e-5, atol=1e-6)
    # and a layer whose weight changes after the switch (a quantizer's, another dtype) runs PyTorch's own
    fp32.to(torch.bfloat16)
    assert torch.allclose(fp32(x.to(torch.bfloat16)).float(), want, rtol=0.05, atol=0.05)
    fp32.to(torch.float32)
    # and switching back restores PyTorch's own forward, leaving other instance forwards alone
    head.forward = lambda x: x
    assert onednn.use_default(model) == 1 and "forward" not in vars(fp32) and "forward" in vars(head)


def test_a_probe_that_finds_onednn_disagreeing_keeps_pytorchs_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given oneDNN's linear answering wrongly (a fault a real build should never show)
    monkeypatch.setattr(onednn, "linear", lambda x, w, b=None: torch.nn.functional.linear(x, w, b) * 1.01)
    model = torch.nn.Sequential(torch.nn.Linear(640, 256))
    # When the loader's choice runs
    choice = onednn.choose(model)
    # Then it keeps PyTorch's linear and says why
    assert not choice.used and choice.layers == 0 and "differs" in choice.why
    assert "forward" not in vars(model[0])


def test_a_serving_process_holds_onednns_compiled_call_sizes_to_a_bounded_cache() -> None:
    import subprocess
    import sys
    from pathlib import Path

    # Given a fresh process that imports the loader, as a worker does before its model work, then
    # multiplies two of the model's layer shapes at 400 different row counts through oneDNN (a
    # primitive compiled per shape and row count: about 0.65 MB each, 520 MB kept without a bound)
    script = """
import os, torch
import worker.model.loader
from worker.model import onednn
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
weights = [torch.randn(1024, 640), torch.randn(640, 2048)]
with torch.inference_mode():
    onednn.linear(torch.randn(8, 640), weights[0])
    base = rss()
    for rows in range(1, 401):
        for w in weights:
            onednn.linear(torch.randn(rows, w.shape[1]), w)
print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'], rss() - base)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3], timeout=300)
    onednn_cap, ideep_cap, grown = out.stdout.split()
    # Then both caches were bounded before oneDNN first ran, and RSS grew by a bounded cache's worth
    # (measured 117 MB; the same script with both caches at their default 1,024: 589 MB)
    assert int(onednn_cap) == int(ideep_cap) == onednn.CACHE_CAPACITY
    assert int(grown) < 200e6


def test_the_cli_probes_onednn_unless_told_not_to_and_reembed_children_keep_the_setting() -> None:
    from cli import settings_env
    from tests.conftest import run_cli
    from worker.settings import Settings

    # Given the same greedy generation through the CLI with the probe and with --no-onednn
    args = ("generate", "The capital of France is", "--max-tokens", "6", "--device", "cpu", "--log-level", "INFO")
    on, off = run_cli(*args), run_cli(*args, "--no-onednn")
    assert on.returncode == 0 and off.returncode == 0, (on.stderr, off.stderr)
    # Then the first probed the kernels and said what it chose, the second never probed, and both
    # print the same text
    assert "linear layers: " in on.stderr and "PyTorch's linear on the model's layer shapes" in on.stderr
    assert "linear layers: " not in off.stderr
    assert on.stdout == off.stdout and on.stdout.strip()
    # and a re-embedding job's children are told the same
    assert settings_env(Settings(onednn=False))["GEMMA_BATCH_ONEDNN"] == "false"
    assert "GEMMA_BATCH_ONEDNN" not in settings_env(Settings())
