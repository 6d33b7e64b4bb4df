"""The word table (input embedding, tied to the output layer) held as the int8 blocks it came from.

A checkpoint converted from GGUF (the embedded Gemma's Q4_K_M file stores this table as Q8_0)
holds, in fp32, values that are exactly an int8 code times one scale per block of 32: 262,144 x
640 fp32 words (671 MB) that are really 168 MB of codes and 21 MB of scales. `exact_blocks`
finds the codes and checks, value by value, that code times scale gives back the fp32 value; only
then does `Int8Table` stand in for the fp32 table, so every row it hands out is the checkpoint's
own fp32 row, bit for bit. The fp32 table's pages in the memory-mapped checkpoint are then given
back (`int4.release_file_pages`). The output layer tied to the table computes its logits from the
same blocks too (`project`: 4,096 words at a time, decoded then multiplied, each logit the same
dot product as the fp32 layer's, so sampling, grammars and `generate` see the same values without
faulting the fp32 table back in). The fp32 parameter stays in place (shapes, ties and anything that
reads it directly still work, reading the same values and faulting their pages back in).

Finding the codes reads the whole fp32 table (about 1.4 s on 2 cores), so `install` keeps them in
the model cache (`<cache>/tables/<key>.safetensors`, keyed by the checkpoint's directory and its
files' names, sizes and modification times; a new table for a rewritten checkpoint replaces the
stale one) and later loads map that file instead: nothing to compute, and only the rows a
call reads become resident. A cached table is used only after a sample of its rows is checked,
bit for bit, against the checkpoint's fp32 rows; one that fails is derived again and rewritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from worker.model import int4

log = logging.getLogger(__name__)

BLOCK = 32  # values per scale (GGUF Q8_0)
PROJECT_ROWS = 4_096  # words per block of the output layer's `project` (10 MB of fp32 decoded at a time)
DERIVE_ROWS = 16_384  # rows per step of `exact_blocks` (42 MB of fp32 at a time)
CACHE_VERSION = 2  # bump when the cached file's layout or naming changes
CHECK_ROWS = 1_024  # rows of a cached table checked against the checkpoint before it is used


def exact_blocks(weight: torch.Tensor, *, release: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes (rows, width), fp32 scales (rows, width / 32)) with codes * scales == weight for
    every value, or None where the table is not such blocks (a checkpoint not converted from Q8_0).
    With `release`, each slice's pages in the memory-mapped checkpoint are given back once read, so
    the fp32 table is never resident whole."""
    rows, width = weight.shape
    if weight.dtype != torch.float32 or width % BLOCK:
        return None
    codes = torch.empty((rows, width), dtype=torch.int8)
    scales = torch.empty((rows, width // BLOCK), dtype=torch.float32)
    mapped = int4.file_ranges() if release else []
    with torch.no_grad():
        for start in range(0, rows, DERIVE_ROWS):
            piece = weight[start: start + DERIVE_ROWS].detach()
            values = piece.reshape(-1, width // BLOCK, BLOCK)
            # Q8_0 codes run to +-127 and the largest value of a block has code +-127 exactly, so
            # |code| <= 127 wherever code * scale gives the value back. A block of zeros divides by
            # the smallest normal float instead of 0 (codes 0).
            scale = values.abs().amax(dim=-1, keepdim=True).div_(127)
            code = (values / scale.clamp_min(torch.finfo(torch.float32).tiny)).round_()
            if not torch.equal(code * scale, values):
                return None
            codes[start: start + DERIVE_ROWS] = code.to(torch.int8).reshape(-1, width)
            scales[start: start + DERIVE_ROWS] = scale.squeeze(-1).reshape(-1, width // BLOCK)
            if release:
                int4.release_file_pages(piece, mapped, whole_storage=False)
    return codes, scales


class Int8Table:
    """The table as codes and scales; rows come out as the fp32 rows they encode."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales = codes, scales
        self.shape = codes.shape
        self.nbytes = codes.nbytes + scales.nbytes

    def _decode(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        values = codes.to(torch.float32) if out is None else out[: codes.shape[0]].copy_(codes)
        values.view(*codes.shape[:-1], codes.shape[-1] // BLOCK, BLOCK).mul_(scales.unsqueeze(-1))  # scaled in place
        return values

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows for token ids of any shape (shape + (width,))."""
        return self._decode(self.codes[ids], self.scales[ids])

    def block(self, start: int, stop: int) -> torch.Tensor:
        """fp32 rows start..stop, contiguous."""
        return self._decode(self.codes[start:stop], self.scales[start:stop])

    def blocks(self, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, fp32 rows start..start + step) over the whole table, each decoded into the same
        buffer (valid until the next one): a fresh 10 MB block would be mapped anew, page by page."""
        buffer = torch.empty(min(step, self.shape[0]), self.shape[1])
        for start in range(0, self.shape[0], step):
            yield start, self._decode(self.codes[start: start + step], self.scales[start: start + step], buffer)


class WeightRows:
    """An fp32 weight's rows, handed out as `Int8Table` hands out its own."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.shape = weight.shape

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.weight[start:stop]

    def blocks(self, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.shape[0], step):
            yield start, self.weight[start: start + step]


def rows_of(head: torch.nn.Linear, table: Int8Table | None = None) -> Int8Table | WeightRows:
    """Where the output layer's fp32 rows are read from: the int8 table if there is one, else its weight."""
    return table if table is not None else WeightRows(head.weight)


def _lookup(self: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Gemma's scaled word embedding (row times `embed_scale`), its rows from the int8 table."""
    return self.int8_table.rows(input_ids) * self.embed_scale.to(torch.float32)


def scores(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`linear(hidden, rows)` for 2-D `hidden` (n, width) and a block of words (words, width), as
    (n, words). On CPU computed as `rows @ hidden.T` and handed back transposed: the same dot
    products, in the orientation the fp32 CPU kernel runs faster for several hidden rows
    (bench/head.py measures both)."""
    if rows.device.type != "cpu":
        return torch.nn.functional.linear(hidden, rows)
    return torch.mm(rows, hidden.T).T


def project(hidden: torch.Tensor, table: Int8Table, bias: torch.Tensor | None = None, *,
            step: int = PROJECT_ROWS) -> torch.Tensor:
    """`linear(hidden, weight, bias)` for the weight the table encodes, one block of `step` words
    at a time (`scores` over each decoded block): every logit is a dot product over the hidden size
    of the fp32 layer's own values, and only one decoded block, not the 671 MB fp32 table, is read
    per step. Values agree with the fp32 layer's to float rounding (bit for bit where the kernel
    sums in the same order)."""
    words, width = table.shape
    flat = hidden.reshape(-1, width)
    out = torch.empty(words, flat.shape[0], dtype=hidden.dtype, device=hidden.device)
    for start, block in table.blocks(step):
        torch.mm(block.to(hidden.dtype), flat.T, out=out[start: start + block.shape[0]])
    if bias is not None:
        out += bias.unsqueeze(1)
    return out.T.reshape(*hidden.shape[:-1], words).contiguous()


def _project(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer's forward, its words read from the int8 table (`project`)."""
    return project(hidden, self.int8_table, self.bias)


def checkpoint_key(directory: Path) -> str:
    """Names the cached table of the checkpoint in `directory`: `<directory's digest>-<files' digest>`,
    the second over its safetensors files' names, sizes and modification times (a rewritten
    checkpoint gets a new key with the same first part, so `keep` can drop the stale table)."""
    directory = Path(directory).resolve()
    place = hashlib.sha256(f"{CACHE_VERSION}:{directory}".encode())
    digest = place.copy()
    for file in sorted(directory.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"|{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{place.hexdigest()[:12]}-{digest.hexdigest()[:20]}"


_KEY = re.compile(r"^(?P<place>[0-9a-f]{12})-[0-9a-f]{20}$")
_OLD_KEY = re.compile(r"^[0-9a-f]{20}$")  # CACHE_VERSION 1's names: no directory part


def drop_stale(path: Path) -> list[Path]:
    """Remove the tables kept beside `path` for earlier versions of the same checkpoint directory
    (same first part of the key) and any of the old naming; others' tables stay. Returns what went."""
    match = _KEY.match(path.stem)
    if match is None:
        return []
    gone = []
    for other in path.parent.glob("*.safetensors"):
        other_key = _KEY.match(other.stem)
        stale = (other_key is not None and other_key["place"] == match["place"]) or _OLD_KEY.match(other.stem)
        if other != path and stale:
            with contextlib.suppress(OSError):
                other.unlink()
                gone.append(other)
    if gone:
        log.info("word table cache: removed %d stale table(s) of this checkpoint (%s)", len(gone),
                 ", ".join(g.name for g in gone))
    return gone


def cached_table(path: Path, weight: torch.Tensor) -> Int8Table | None:
    """The table kept at `path`, memory-mapped, if it is there, has the weight's shape and gives
    back a sample of the weight's rows (spread over the whole table) bit for bit; else None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except FileNotFoundError:
        return None
    except (OSError, SafetensorError) as exc:
        log.warning("word table cache %s unreadable (%s); deriving it again", path, exc)
        return None
    codes, scales = tensors.get("codes"), tensors.get("scales")
    rows, width = weight.shape
    if (codes is None or scales is None or codes.dtype != torch.int8 or scales.dtype != torch.float32
            or tuple(codes.shape) != (rows, width) or tuple(scales.shape) != (rows, width // BLOCK)):
        log.warning("word table cache %s does not fit this checkpoint; deriving it again", path)
        return None
    table = Int8Table(codes, scales)
    ids = torch.linspace(0, rows - 1, min(CHECK_ROWS, rows)).long()
    if not torch.equal(table.rows(ids), weight.detach()[ids]):
        log.warning("word table cache %s differs from the checkpoint; deriving it again", path)
        return None
    return table


def keep(path: Path, table: Int8Table) -> bool:
    """Write the table to `path` (whole or not at all); a cache that cannot be written is only logged."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"codes": table.codes, "scales": table.scales}, str(tmp))
        os.replace(tmp, path)
        drop_stale(path)
    except OSError as exc:
        log.info("word table not cached at %s (%s); the next load derives it again", path, exc)
        with contextlib.suppress(OSError):  # e.g. its folder is a file
            tmp.unlink(missing_ok=True)
        return False
    return True


def install(lm: torch.nn.Module, cache: Path | None = None) -> Int8Table | None:
    """Serve the input embedding and the tied output layer of a CPU fp32 Gemma from its table's int8
    blocks and give the fp32 table's checkpoint pages back. `cache`: the file to read the blocks from, or to keep them in
    once derived. Returns the table (for the output layer's greedy path), or None where it does
    not apply: not a tied fp32 Gemma word table, or values that are not int8 blocks."""
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if (type(embedding).__name__ != "Gemma3TextScaledWordEmbedding" or not isinstance(head, torch.nn.Linear)
            or head.weight.data_ptr() != embedding.weight.data_ptr() or embedding.weight.device.type != "cpu"
            or embedding.weight.dtype != torch.float32):
        return None
    started = time.monotonic()
    table = cached_table(cache, embedding.weight) if cache is not None else None
    if table is not None:
        int4.release_file_pages(embedding.weight, int4.file_ranges(), whole_storage=False)  # the checked rows
        how = f"read from {cache}"
    else:
        found = exact_blocks(embedding.weight, release=True)
        if found is None:
            log.info("word table: not int8 blocks, kept in fp32")
            return None
        table = Int8Table(*found)
        kept = cache is not None and keep(cache, table)
        how = f"derived, kept in {cache}" if kept else "derived"
    embedding.int8_table = head.int8_table = table
    embedding.forward = types.MethodType(_lookup, embedding)
    head.forward = types.MethodType(_project, head)
    log.info("word table: int8 blocks (%.0f MB for %.0f MB of fp32, exact), %s in %.1fs",
             table.nbytes / 1e6, embedding.weight.nbytes / 1e6, how, time.monotonic() - started)
    return table
