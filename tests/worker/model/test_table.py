"""The word table held as the int8 blocks it came from (worker/model/table.py): every row it gives
is the checkpoint's fp32 row bit for bit, the embedding and the greedy head read it, and a fresh
worker keeps none of the fp32 table resident, full logits included."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from safetensors.torch import load_file, save_file

from tests.conftest import REPO
from worker.engine import Engine
from worker.model import int4
from worker.model.table import Int8Table, cached_table, checkpoint_key, exact_blocks, keep, project


def test_the_word_table_gives_back_every_fp32_row_bit_for_bit(engine: Engine) -> None:
    # Given the engine on CPU (fp32), whose loader found the word table to be int8 blocks
    table = engine.model.table
    embedding = engine.model.lm.get_input_embeddings()
    weight = embedding.weight.detach()
    assert table is not None and table.codes.dtype == torch.int8 and table.nbytes < weight.nbytes / 3
    # When every row is read through the table, and through the input embedding (which now uses it)
    for start in range(0, weight.shape[0], 32_768):
        ids = torch.arange(start, min(start + 32_768, weight.shape[0]))
        # Then each is the fp32 checkpoint's row, and each token's input is what Gemma's own
        # scaled embedding computes from the fp32 table
        assert torch.equal(table.block(start, start + 32_768), weight[start: start + 32_768])
        assert torch.equal(table.rows(ids), weight[ids])
        with torch.no_grad():
            assert torch.equal(embedding(ids), torch.nn.functional.embedding(ids, weight) * embedding.embed_scale)


def test_a_table_that_is_not_int8_blocks_stays_in_fp32(engine: Engine) -> None:
    # Given real rows of the table, and the same rows with one value nudged by one unit in the last place
    rows = engine.model.lm.get_input_embeddings().weight.detach()[:64].clone()
    assert exact_blocks(rows) is not None
    rows[5, 7] = torch.nextafter(rows[5, 7], torch.tensor(float("inf")))
    # When blocks are sought / Then none are found (the table would not be exact), nor for random
    # values or a width that is not a multiple of 32
    assert exact_blocks(rows) is None
    assert exact_blocks(torch.randn(64, 640)) is None
    assert exact_blocks(torch.zeros(4, 20)) is None
    # and a block of zeros is exact (codes 0)
    codes, scales = exact_blocks(torch.zeros(4, 64))
    assert not codes.any() and not scales.any()


def test_the_greedy_head_reading_the_table_picks_the_fp32_layers_tokens(engine: Engine) -> None:
    # Given real final hidden states (the prompts' last positions)
    decoder = engine.decoder
    items = engine.tokenize(["The capital of France is", "def add(a, b):", "Pub/Sub delivers messages"],
                            truncate=False, what="prompt")
    with torch.no_grad():
        hidden = torch.cat([engine.model.body(input_ids=torch.tensor([it.ids])).last_hidden_state[:, -1]
                            for it in items])
    hidden = torch.cat([hidden, hidden * 0.5, -hidden])
    # When the full layer's greedy choice is made from the table's blocks and from the fp32 weights
    assert decoder.table is engine.model.table
    from_table = decoder.best_blocked(hidden)
    decoder.table = None
    try:
        from_fp32 = decoder.best_blocked(hidden)
        logits = decoder.logits(hidden)
    finally:
        decoder.table = engine.model.table
    # Then the tokens are the same, and the model's own head's argmax
    assert from_table == from_fp32 == logits.argmax(dim=-1).tolist()


def test_the_output_layer_reading_the_table_gives_the_fp32_layers_logits(engine: Engine) -> None:
    # Given the engine's output layer, which the loader pointed at the table, real final hidden
    # states in the shapes sampling (rows) and `generate` (batch, positions) hand it, and the fp32
    # weight copied out of the mapped checkpoint (one row's dot products depend on where the weight
    # lies: the checkpoint maps it 56 bytes past a 64-byte boundary, where the kernel rounds differently)
    lm = engine.model.lm
    head = lm.get_output_embeddings()
    assert head.int8_table is engine.model.table
    items = engine.tokenize(["The capital of France is", "def add(a, b):", "Pub/Sub delivers"], truncate=False,
                            what="prompt")
    with torch.no_grad():
        states = lm.model(input_ids=torch.tensor([it.ids[:4] for it in items])).last_hidden_state
    weight = head.weight.detach()
    fp32 = weight.clone()
    for hidden in (states[0, -1:], states[:2, -1], states, states[:, 1:3].transpose(0, 1)):
        # When its logits are computed
        with torch.no_grad():
            got = head(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        # Then they are the fp32 layer's dot products bit for bit (in the orientation it computes them),
        assert got.shape == (*hidden.shape[:-1], weight.shape[0]) and got.is_contiguous()
        assert torch.equal(got.reshape(-1, weight.shape[0]), torch.mm(fp32, flat.T).T)
        # within float rounding of the model's own fp32 `linear`, with the same best token
        reference = torch.nn.functional.linear(hidden, weight)
        assert (got - reference).abs().max() <= 1e-6 * reference.abs().max() * hidden.shape[-1] ** 0.5
        assert torch.equal(got.argmax(dim=-1), reference.argmax(dim=-1))
    # and blocks that do not divide the vocabulary change nothing
    assert torch.equal(project(states[:, -1], engine.model.table, step=5_000), head(states[:, -1]))


def _in_a_file_mapping(tensor: torch.Tensor) -> bool:
    return any(low <= tensor.data_ptr() < high for low, high in int4.file_ranges())


def test_a_kept_table_is_read_back_mapped_and_only_if_it_matches_the_checkpoint(
        engine: Engine, tmp_path: Path, caplog) -> None:
    # Given the engine's table kept in a cache file
    table, weight = engine.model.table, engine.model.lm.get_input_embeddings().weight
    path = tmp_path / "tables" / "key.safetensors"
    assert keep(path, table)
    # When it is read back / Then its codes are mapped from the file, not copied, and every row is
    # the same as the derived table's
    again = cached_table(path, weight)
    assert again is not None and _in_a_file_mapping(again.codes)
    assert torch.equal(again.codes, table.codes) and torch.equal(again.scales, table.scales)
    # But a file with one code changed in a row the check reads, a file cut to fewer rows, and a
    # file that is not safetensors are each refused (the loader then derives the table again)
    kept = load_file(path)
    changed = kept["codes"].clone()
    changed[0, 3] += 1
    save_file({"codes": changed, "scales": kept["scales"]}, str(tmp_path / "changed.safetensors"))
    save_file({"codes": kept["codes"][:100].clone(), "scales": kept["scales"][:100].clone()},
              str(tmp_path / "short.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a table")
    with caplog.at_level(logging.WARNING, logger="worker.model.table"):
        for name in ("changed", "short", "junk"):
            assert cached_table(tmp_path / f"{name}.safetensors", weight) is None, name
    assert len([r for r in caplog.records if "deriving it again" in r.message]) == 3
    assert cached_table(tmp_path / "absent.safetensors", weight) is None
    # And a cache that cannot be written is not an error: the table is just not kept
    (tmp_path / "file").write_text("")
    assert not keep(tmp_path / "file" / "key.safetensors", table)


def test_the_cache_key_changes_when_the_checkpoint_is_rewritten(tmp_path: Path) -> None:
    # Given a checkpoint directory and its key
    save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    key = checkpoint_key(tmp_path)
    assert checkpoint_key(tmp_path) == key
    # When the file is rewritten (a new modification time), or another weights file appears
    stat = (tmp_path / "model.safetensors").stat()
    os.utime(tmp_path / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    rewritten = checkpoint_key(tmp_path)
    save_file({"w": torch.zeros(4)}, str(tmp_path / "model-2.safetensors"))
    # Then each gives a new key, so no stale table is read for it
    assert len({key, rewritten, checkpoint_key(tmp_path)}) == 3


def test_a_new_table_replaces_the_stale_one_of_its_checkpoint_only(tmp_path: Path, caplog) -> None:
    # Given two checkpoint directories, a small table, and a cache holding a table for each, plus
    # one of the old naming (no directory part)
    first, second, tables = tmp_path / "first", tmp_path / "second", tmp_path / "tables"
    for directory in (first, second):
        directory.mkdir()
        save_file({"w": torch.zeros(4)}, str(directory / "model.safetensors"))
    table = Int8Table(torch.ones(2, 64, dtype=torch.int8), torch.ones(2, 2))
    stale, other = tables / f"{checkpoint_key(first)}.safetensors", tables / f"{checkpoint_key(second)}.safetensors"
    old_naming = tables / "0123456789abcdef0123.safetensors"
    assert keep(stale, table) and keep(other, table)
    old_naming.write_bytes(b"an old table")
    (tables / "notes.txt").write_text("not a table")
    # When the first checkpoint is rewritten and its new table is kept
    stat = (first / "model.safetensors").stat()
    os.utime(first / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    fresh = tables / f"{checkpoint_key(first)}.safetensors"
    assert fresh != stale and fresh.stem.split("-")[0] == stale.stem.split("-")[0]
    with caplog.at_level(logging.INFO, logger="worker.model.table"):
        assert keep(fresh, table)
    # Then the stale table of the first and the old-named one are gone, the second's and other
    # files stay, and the log says what went
    assert sorted(f.name for f in tables.iterdir()) == sorted([fresh.name, other.name, "notes.txt"])
    assert any("removed 2 stale table(s)" in r.message for r in caplog.records)


PROBE = """
import json, mmap, sys
import numpy as np
from worker.engine import build_engine
from worker.model import int4
from worker.settings import Settings

def resident_mb(tensor):
    storage = tensor.untyped_storage()
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(storage.data_ptr() // page * 8)
        entries = np.frombuffer(pagemap.read(storage.nbytes() // page * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page / 2**20

engine = build_engine(Settings(device="cpu"))
weight = engine.model.lm.get_input_embeddings().weight
after_build = resident_mb(weight)
codes = engine.model.table.codes.data_ptr()
mapped = any(low <= codes < high for low, high in int4.file_ranges())
engine.generate(["The capital of France is", "def add(a, b):"], max_new_tokens=8)
engine.embed(["Pub/Sub delivers at least once."])
# sampling (full logits), a grammar (through `generate`), and a prompt past the sliding window
engine.generate(["Once upon a time"], max_new_tokens=8, temperature=0.9, seed=3)
engine.generate(["A colour as JSON:"], max_new_tokens=8, response_schema={"type": "object"})
engine.generate([" ".join(["river"] * 700)], max_new_tokens=2)
after_work = resident_mb(weight)
# the greedy head's screen: choosing its kind (a bf16 probe on 4,096 words) and building it
engine.decoder.ensure_screen()
print(json.dumps({"after_build": after_build, "after_work": after_work, "table_mb": weight.nbytes / 2**20,
                  "codes_mapped": mapped, "screen_mb": resident_mb(weight) - after_work}))
"""


def test_a_fresh_worker_keeps_none_of_the_fp32_table_resident(engine: Engine) -> None:
    # Given a fresh process that builds the engine as a worker does, after this one's build (which
    # kept the table in the model cache), then generates and embeds
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Then of the 640 MiB fp32 table in the memory-mapped checkpoint, at most a few MiB are resident
    # after the build and after the work, sampling, a grammar and `generate` included (the int8
    # blocks serve the lookup, the greedy head and the output layer's full logits)
    assert got["table_mb"] == 640 and got["after_build"] < 16 and got["after_work"] < 16, got
    # and choosing and building the greedy head's screen reads the int8 blocks too (its bf16 probe
    # would fault 10 MiB of the fp32 rows back in)
    assert got["screen_mb"] < 4, got
    # and its table came from the cache file, mapped, not derived again
    assert got["codes_mapped"], got
