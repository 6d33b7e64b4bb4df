"""Model sources and the conversion cache, on the real embedded GGUF (the conversion of the whole
file runs in `make setup`; the `.gguf` source test converts a cut of it, tests/fixtures/gguf.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.fixtures.gguf import cut_gguf
from worker.model import ModelSourceError, PreparedModel, choose_placement, embedded_gguf_path, prepare_model
from worker.model.loader import load_tokenizer
from worker.settings import Settings


@pytest.mark.slow
def test_second_prepare_reuses_the_converted_directory(tmp_path: Path, settings: Settings) -> None:
    # Given a `.gguf` source (the embedded Gemma's first two layers and 4,096 words, its bytes as
    # they are, so the conversion takes seconds), and an empty cache
    gguf = cut_gguf(embedded_gguf_path(settings.cache_dir), tmp_path / "gemma-cut.gguf")
    cache = tmp_path / "cache"
    # When `model prepare` runs twice, as a user would
    first = run_cli("model", "prepare", "--model", str(gguf), "--cache-dir", str(cache))
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    converted = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in path.iterdir()}
    second = run_cli("model", "prepare", "--model", str(gguf), "--cache-dir", str(cache))
    # Then both print the same safetensors directory, the first converted it, and the second
    # reused it as it was: no file in it was written again or added
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == str(path)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert "converted" in first.stderr and "reused" in second.stderr
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in path.iterdir()} == converted
    # and the converted checkpoint is the cut model: its layers, its words, a tokenizer for them
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["vocab_size"]) == (2, 4096)
    tokenizer = load_tokenizer(path)
    assert len(tokenizer) == 4096 and tokenizer.convert_ids_to_tokens([1, 2]) == ["<eos>", "<bos>"]


def test_local_directory_source_is_used_in_place(settings: Settings) -> None:
    # Given the prepared embedded model's directory
    prepared = prepare_model("embedded", settings.cache_dir)
    # When it is given as a source / Then it is used as it is, not copied or converted
    again = prepare_model(str(prepared.path), settings.cache_dir)
    assert again.path == prepared.path and not again.converted_now
    # and its width is read from its config without loading it
    assert again.hidden_size() == 640


def test_the_width_comes_from_the_text_config_or_is_unknown(tmp_path: Path) -> None:
    # Given a multimodal config (the text model's width inside), a plain one, one without a width and none
    for name, config in [("multi", {"text_config": {"hidden_size": 2560}, "vision_config": {"hidden_size": 1152}}),
                         ("plain", {"hidden_size": 640}), ("silent", {"model_type": "gemma3_text"})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    # Then each gives the text model's width, or None
    widths = {name: PreparedModel(path=tmp_path / name, name=name, source=name).hidden_size()
              for name in ("multi", "plain", "silent", "broken", "absent")}
    assert widths == {"multi": 2560, "plain": 640, "silent": None, "broken": None, "absent": None}


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("/no/such/file.gguf", "does not exist"),
        ("not a model", "not a local directory"),
    ],
)
def test_bad_sources_give_clear_errors(tmp_path: Path, source: str, words: str) -> None:
    with pytest.raises(ModelSourceError, match=words):
        prepare_model(source, tmp_path)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        prepare_model(str(tmp_path / "weights"), tmp_path)


def test_hub_id_without_network_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no way to reach the Hugging Face hub (offline mode, as on this machine)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # When a hub id is asked for / Then the error says what to check
    with pytest.raises(ModelSourceError, match="HF_TOKEN"):
        prepare_model("google/gemma-3-4b-it", tmp_path)


def test_device_choice_falls_back_to_cpu_fp32_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Given CUDA asked for explicitly
    with caplog.at_level(logging.WARNING):
        placement = choose_placement("cuda")
    if torch.cuda.is_available():
        assert placement.device.type == "cuda" and placement.dtype in (torch.bfloat16, torch.float16)
        return
    # Then on a machine without CUDA it runs on CPU in fp32 and says so
    assert placement.device.type == "cpu" and placement.dtype == torch.float32
    assert "falling back to CPU" in caplog.text
    assert choose_placement("cpu").dtype == torch.float32


def test_cuda_placements_turn_cudnn_attention_off_and_cpu_ones_leave_it() -> None:
    from worker.model.device import Placement, attention_without_per_shape_plans

    kept = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        # Given cuDNN attention enabled (torch's default)
        torch.backends.cuda.enable_cudnn_sdp(True)
        # When a CPU placement is set up, nothing changes
        attention_without_per_shape_plans(Placement(torch.device("cpu"), torch.float32))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        # Then a CUDA one turns it off, so attention never builds a plan per call size
        attention_without_per_shape_plans(Placement(torch.device("cuda"), torch.bfloat16))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        # and the other fused kernels stay available
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(kept)
