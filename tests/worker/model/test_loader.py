"""The loader builds a converted checkpoint's tokenizer straight from its tokenizer.json
(`load_tokenizer`): the same tokenizer AutoTokenizer gives, in about half the time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from worker.model.loader import load_tokenizer
from worker.model.source import prepare_model
from worker.settings import Settings

SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id", "all_special_ids",
           "all_special_tokens", "added_tokens_decoder", "model_max_length")


@pytest.fixture(scope="module")
def converted(settings: Settings) -> Path:
    return prepare_model(settings.model, settings.cache_dir).path


def test_a_converted_checkpoints_tokenizer_is_the_one_autotokenizer_builds(converted: Path,
                                                                           docstrings: list[str]) -> None:
    # Given the embedded model's converted directory, its tokenizer built directly and by AutoTokenizer
    direct, auto = load_tokenizer(converted), AutoTokenizer.from_pretrained(converted)
    assert type(direct).__name__ == "TokenizersBackend" and type(auto).__name__ == "GemmaTokenizer"
    texts = docstrings[:300] + ["", " ", "  two leading spaces", "<bos>x<eos>", "<start_of_turn>user\nhi<end_of_turn>",
                                "émoji 🎉 中文 \t\n tabs", "<pad><mask><unk>", "\u200b zero width"]
    # When both tokenize the same texts, with and without special tokens, and decode the ids
    ids = auto(texts)["input_ids"]
    # Then every id, every decoded text and every special token is the same
    assert direct(texts)["input_ids"] == ids
    assert direct(texts, add_special_tokens=False)["input_ids"] == auto(texts, add_special_tokens=False)["input_ids"]
    assert [direct.decode(x) for x in ids] == [auto.decode(x) for x in ids]
    assert direct.batch_decode(ids, skip_special_tokens=True) == auto.batch_decode(ids, skip_special_tokens=True)
    for name in SPECIAL:
        assert getattr(direct, name) == getattr(auto, name), name
    assert direct.get_vocab() == auto.get_vocab()
    assert direct.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()


def test_other_directories_load_through_autotokenizer(converted: Path, tmp_path: Path) -> None:
    # Given copies of the converted tokenizer: one without the conversion's marker (a directory
    # this project did not write), one with a chat template the direct build would leave out
    plain, templated = tmp_path / "plain", tmp_path / "templated"
    for directory in (plain, templated):
        directory.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(converted / name, directory / name)
    shutil.copy(converted / "prepared.json", templated / "prepared.json")
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    # When each is loaded / Then AutoTokenizer's class builds it, the template kept
    assert type(load_tokenizer(plain)).__name__ == "GemmaTokenizer"
    loaded = load_tokenizer(templated)
    assert type(loaded).__name__ == "GemmaTokenizer" and loaded.chat_template == config["chat_template"]
