"""CPU int4 (`--quantize int4`, lossy): 4-bit groups that reproduce a weight grid exactly, a layer
that computes what its dequantized weights compute, every linear layer of the real model replaced
(the output layer too), answers close to fp32, and the decoder's greedy tokens equal to what the
same quantized model's own `generate` picks."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.engine import Engine, build_engine
from worker.model import int4
from worker.settings import Settings


# What the int4 engine's checkpoint mapping held resident right after the build, before any lookup
_AFTER_BUILD: dict[str, int | None] = {}


@pytest.fixture(scope="module")
def int4_engine(settings: Settings) -> Engine:
    engine = build_engine(Settings(device="cpu", cache_dir=settings.cache_dir, quantize="int4"))
    _AFTER_BUILD["resident"] = _resident_bytes(*_checkpoint_and_embedding(engine))
    return engine


def _checkpoint_and_embedding(engine: Engine) -> tuple[str, int]:
    lm = engine.model.lm
    return (str(next(Path(lm.name_or_path).glob("*.safetensors"))),
            lm.get_input_embeddings().weight.untyped_storage().data_ptr())


def test_a_group_on_a_sixteen_level_grid_comes_back_exactly() -> None:
    # Given rows whose groups of 32 hold values offset + scale * k, k = 0..15, every level used,
    # with scale and offset representable in bf16 (as a Q4_K-style block would be)
    torch.manual_seed(0)
    levels = torch.stack([torch.randperm(32) % 16 for _ in range(8 * 4)]).float().reshape(8, 128)
    scale = torch.tensor([0.125, 0.0625, 0.5, 0.25]).repeat_interleave(32)
    offset = torch.tensor([-1.0, 0.5, -0.25, 2.0]).repeat_interleave(32)
    weight = offset + scale * levels
    # When quantized / Then dequantizing gives every value back bit for bit
    codes, scales_offsets = int4.quantize_groups(weight)
    assert torch.equal(int4.dequantize(codes, scales_offsets), weight)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 15
    assert scales_offsets.shape == (4, 8, 2) and scales_offsets.dtype == torch.bfloat16


def test_least_squares_refits_bring_real_weights_closer(loaded_model) -> None:
    weight = loaded_model.body.layers[3].mlp.down_proj.weight.detach()
    errors = []
    for refits in (0, 1, 2):
        codes, so = int4.quantize_groups(weight, refits=refits)
        errors.append(float((int4.dequantize(codes, so) - weight).norm() / weight.norm()))
    # 4 bits leave a few percent of error; each least-squares pass takes some of it away
    assert errors[0] < 0.1 and errors[2] < errors[1] < errors[0]


def test_an_int4_layer_computes_what_its_dequantized_weights_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 160, bias=True)
    # quantized and packed in chunks of 64 rows, the last one short (as the 262,144-row output layer
    # is, in bigger chunks); a chunk size that would split the packing's 64-row blocks is rounded
    monkeypatch.setattr(int4, "CHUNK_ROWS", 80)
    layer = int4.Int4Linear(linear)
    codes, so = int4.quantize_groups(linear.weight.detach())
    assert torch.equal(layer.packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    assert torch.equal(layer.scales_offsets, so)
    # any leading shape, fp32 in and out; bf16 activations and output keep it within bf16 rounding
    x = torch.randn(2, 5, 64)
    expected = x.to(torch.bfloat16).float() @ int4.dequantize(codes, so).T + linear.bias.detach()
    got = layer(x)
    assert got.shape == (2, 5, 160) and got.dtype == torch.float32
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-2
    # and really lossy against the fp32 layer, yet close
    exact = linear(x).detach()
    assert 1e-4 < float((got - exact).norm() / exact.norm()) < 0.1


def test_layers_the_kernel_cannot_take_stay_fp32() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 24), torch.nn.Linear(24, 16))
    # 64 -> 32 fits (input a multiple of 32, output of 16); 32 -> 24 and 24 -> 16 do not
    assert int4.quantize_model(model) == 1
    assert [type(m).__name__ for m in model] == ["Int4Linear", "Linear", "Linear"]
    assert model(torch.randn(3, 64)).shape == (3, 16)


def test_int4_replaces_every_linear_layer_and_the_output_layer(int4_engine: Engine, engine: Engine) -> None:
    lm = int4_engine.model.lm
    assert not [name for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    replaced = [m for m in lm.modules() if isinstance(m, int4.Int4Linear)]
    assert len(replaced) == sum(isinstance(m, torch.nn.Linear) for m in engine.model.lm.modules())
    # the decoder takes the quantized head's whole output (not the fp32 blocks of a tied weight)
    assert isinstance(int4_engine.decoder.head, int4.Int4Linear)
    assert int4_engine.decoder.head.out_features == engine.model.lm.config.get_text_config().vocab_size
    # the input embedding stays fp32 (a lookup); everything else is packed: well under the fp32 size
    assert lm.get_input_embeddings().weight.dtype == torch.float32
    size = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()])
    fp32_size = sum(p.numel() * p.element_size() for p in engine.model.lm.parameters())
    assert size < 0.8 * fp32_size
    assert int4_engine.name == engine.name + "+int4"


def test_int4_answers_are_close_to_fp32_but_not_identical(int4_engine: Engine, engine: Engine,
                                                          docstrings: list[str]) -> None:
    texts = docstrings[:24]
    cosines = np.sum(engine.embed(texts).vectors * int4_engine.embed(texts).vectors, axis=1)
    # measured 0.97 on average over 500 texts (docs/PERFORMANCE.md); broken codes give unrelated vectors
    assert cosines.mean() > 0.95 and cosines.min() > 0.9
    assert cosines.min() < 0.9999


def test_int4_greedy_tokens_equal_the_quantized_models_own_generate(int4_engine: Engine) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return", "Water boils at"]
    ours = int4_engine.generate(prompts, max_new_tokens=12)
    lm, tokenizer = int4_engine.model.lm, int4_engine.tokenizer
    for prompt, out in zip(prompts, ours):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            reference = lm.generate(input_ids=ids, max_new_tokens=12, do_sample=False, top_k=None, top_p=None,
                                    temperature=None, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=sorted(int4_engine.eos_ids))
        expected = reference[0, ids.shape[1]:].tolist()
        cut = next((j for j, t in enumerate(expected) if t in int4_engine.eos_ids), None)
        assert out.token_ids == (expected if cut is None else expected[:cut]) and out.token_ids


def _resident_bytes(path: str, address: int | None = None) -> int | None:
    """Resident bytes of this process's mappings of `path` (only the one holding `address`, if
    given); None when there is no such mapping."""
    total, current = None, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if not parts[0].endswith(":"):
                low, high = (int(x, 16) for x in parts[0].split("-"))
                current = (len(parts) > 5 and parts[5] == path
                           and (address is None or low <= address < high))
            elif parts[0] == "Rss:" and current:
                total = (total or 0) + int(parts[1]) * 1024
    return total


def test_released_checkpoint_pages_come_back_unchanged_and_written_ones_are_kept(tmp_path) -> None:
    # Given a tensor in a private file mapping (as transformers maps a safetensors checkpoint), read once
    path = str(tmp_path / "weights.bin")
    np.arange(1 << 22, dtype=np.float32).tofile(path)
    mapped = torch.from_file(path, shared=False, size=1 << 22, dtype=torch.float32)
    total = float(mapped.sum())
    assert _resident_bytes(path) == 16 << 20
    # When its pages are released / Then none stays resident, and reading faults the same bytes back
    assert int4.release_file_pages(mapped, int4.file_ranges())
    assert _resident_bytes(path) == 0
    assert float(mapped.sum()) == total
    # A tensor with a written page is left alone (releasing would undo the write), as is owned memory
    mapped[5] = -1.0
    assert not int4.release_file_pages(mapped, int4.file_ranges())
    assert float(mapped[5]) == -1.0 and float(mapped[6]) == 6.0 and float(mapped[-1]) == (1 << 22) - 1
    assert not int4.release_file_pages(torch.ones(1 << 20), int4.file_ranges())


def test_quantizing_leaves_the_fp32_checkpoint_out_of_memory(int4_engine: Engine) -> None:
    # The fp32 checkpoint (1.07 GB, mapped by the loader) is read whole to quantize it; right after the
    # build almost none of it is resident (0.76 MB measured; 1.05 GB stayed before the release)
    checkpoint, embedding = _checkpoint_and_embedding(int4_engine)
    assert _AFTER_BUILD["resident"] is not None and _AFTER_BUILD["resident"] < 16e6
    # A lookup faults back only the page-cache folios holding the rows it reads: at most two per
    # distinct token, of at most 2 MB each (kernels that map whole large folios map that much)
    texts = ["Water boils at a hundred degrees", "The capital of France is Paris"]
    tokens = {t for text in texts for t in int4_engine.tokenizer(text).input_ids}
    before = _resident_bytes(checkpoint, embedding)
    assert int4_engine.embed(texts).vectors.shape[0] == 2
    after = _resident_bytes(checkpoint, embedding)
    assert before is not None and after is not None
    assert after - before <= len(tokens) * 2 * (2 << 20)


def test_the_kernels_speed_against_fp32_is_measured_and_a_slower_cpu_is_warned(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from worker.model import loader
    from worker.model.device import Placement

    # The timing is real on this CPU (which of the two wins depends on the CPU's kernels)
    int4_s, fp32_s = int4.kernel_against_fp32(rounds=2)
    assert int4_s > 0 and fp32_s > 0
    assert int4.slower_than_fp32_warning(0.001, 0.003) is None
    message = int4.slower_than_fp32_warning(0.0057, 0.0031)
    assert message is not None and "5.7 ms" in message and "3.1 ms" in message
    # Given a model quantized on a CPU where the kernel is slower (a timing this CPU may not give)
    monkeypatch.setattr(int4, "kernel_against_fp32", lambda: (0.0057, 0.0031))
    body = torch.nn.Sequential(torch.nn.Linear(640, 2048, bias=False))
    loaded = loader.LoadedModel(name="tiny", body=body, lm=None, tokenizer=None,
                                placement=Placement(device=torch.device("cpu"), dtype=torch.float32),
                                max_positions=8, hidden_size=640, load_seconds=0.0)
    with caplog.at_level("WARNING", logger="worker.model.loader"):
        quantized = loader.quantize_int4_cpu(loaded)
    # Then it is still quantized as asked, and the user is told the exact engine is likely faster
    assert isinstance(quantized.body[0], int4.Int4Linear) and quantized.name == "tiny+int4"
    assert [r.getMessage() for r in caplog.records] == [message]
    # and on a CPU where the kernel wins, nothing is said
    caplog.clear()
    monkeypatch.setattr(int4, "kernel_against_fp32", lambda: (0.001, 0.003))
    body = torch.nn.Sequential(torch.nn.Linear(640, 2048, bias=False))
    loader.quantize_int4_cpu(dataclasses.replace(loaded, body=body))
    assert caplog.records == []
