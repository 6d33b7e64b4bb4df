"""Where a run's objects live and how their rows are encoded as Parquet.

    {out}/latest                                      pointer to the newest finished run (JSON)
    {out}/{run}/_RUN.json                             what the run is: model, dims, previous run, tasks
    {out}/{run}/_plan/part-00000.json                 a shard's row count, for progress
    {out}/{run}/_chunks/part-00000-000000000.parquet  checkpoints: fixed row ranges of the sorted shard
    {out}/{run}/_shards/part-00000.json               a finished shard's counts and checksum
    {out}/{run}/part-00000.parquet                    the shard: id, content_sha256, model, dims, embedding
    {out}/{run}/_MANIFEST.json                        written once every shard exists; then `latest` moves
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.errors import JobError

LATEST = "latest"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.fullmatch(run_id or "") or run_id == LATEST:
        raise JobError("invalid_run_id", f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-', start "
                       "with a letter or digit, and not be 'latest'")
    return run_id


@dataclass(frozen=True)
class RunLayout:
    """Object names of one run, relative to the output root."""

    run_id: str

    @property
    def spec(self) -> str:
        return f"{self.run_id}/_RUN.json"

    @property
    def manifest(self) -> str:
        return f"{self.run_id}/_MANIFEST.json"

    def plan(self, index: int) -> str:
        return f"{self.run_id}/_plan/part-{index:05d}.json"

    @property
    def plans_prefix(self) -> str:
        return f"{self.run_id}/_plan/"

    def chunk(self, index: int, start: int) -> str:
        return f"{self.chunk_prefix(index)}{start:09d}.parquet"

    def chunk_prefix(self, index: int) -> str:
        return f"{self.run_id}/_chunks/part-{index:05d}-"

    @property
    def chunks_prefix(self) -> str:
        return f"{self.run_id}/_chunks/"

    def shard_stats(self, index: int) -> str:
        return f"{self.run_id}/_shards/part-{index:05d}.json"

    @property
    def shard_stats_prefix(self) -> str:
        return f"{self.run_id}/_shards/"

    def part(self, index: int) -> str:
        return f"{self.run_id}/part-{index:05d}.parquet"


def chunk_start(name: str) -> int:
    """The first row of a chunk, from its name."""
    return int(name.rsplit("-", 1)[1].removesuffix(".parquet"))


def chunk_shard(name: str) -> int:
    """The shard a chunk belongs to, from its name."""
    return int(name.rsplit("/", 1)[1].split("-")[1])


def record_shard(name: str) -> int:
    """The shard a plan or shard-count record is about, from its name."""
    return int(name.rsplit("-", 1)[1].removesuffix(".json"))


@dataclass(frozen=True)
class Rows:
    """Rows of one shard or chunk, in id order; vectors are (n, dims) float32."""

    ids: list[str]
    content_sha256: list[str]
    model: str
    dims: int
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def encode_rows(rows: Rows, *, metadata: dict[str, Any] | None = None) -> bytes:
    """Parquet bytes; the same rows and metadata always give the same bytes (checksums compare runs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dims = rows.vectors.shape if len(rows) else (0, rows.dims)
    flat = pa.array(np.ascontiguousarray(rows.vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * dims, dims, dtype=np.int32) if n else np.zeros(1, np.int32))
    schema = pa.schema([("id", pa.string()), ("content_sha256", pa.string()), ("model", pa.string()),
                        ("dims", pa.int32()), ("embedding", pa.list_(pa.float32()))],
                       metadata={b"reembed": json.dumps(metadata, sort_keys=True).encode()} if metadata else None)
    table = pa.Table.from_arrays([
        pa.array(rows.ids, type=pa.string()), pa.array(rows.content_sha256, type=pa.string()),
        pa.array([rows.model] * n, type=pa.string()), pa.array([dims] * n, type=pa.int32()),
        pa.ListArray.from_arrays(offsets, flat)], schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def decode_rows(data: bytes, *, where: str) -> tuple[Rows, dict[str, Any]]:
    """Rows and the metadata `encode_rows` stored; a part from another model or width is an error."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    meta = (table.schema.metadata or {}).get(b"reembed")
    models = set(table.column("model").to_pylist())
    dims = set(table.column("dims").to_pylist())
    if len(models) > 1 or len(dims) > 1:
        raise JobError("mixed_output", f"{where} mixes models {sorted(models)} or dims {sorted(dims)}; "
                       "one run holds one model and width")
    width = dims.pop() if dims else 0
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    rows = Rows(ids=table.column("id").to_pylist(), content_sha256=table.column("content_sha256").to_pylist(),
                model=models.pop() if models else "", dims=width,
                vectors=flat.astype(np.float32, copy=False).reshape(table.num_rows, width))
    return rows, json.loads(meta) if meta else {}


def concat_rows(parts: list[Rows], *, model: str, dims: int) -> Rows:
    parts = [p for p in parts if len(p)]  # an empty shard decodes with width 0
    if not parts:
        return Rows(ids=[], content_sha256=[], model=model, dims=dims, vectors=np.zeros((0, dims), np.float32))
    return Rows(ids=[i for p in parts for i in p.ids], content_sha256=[s for p in parts for s in p.content_sha256],
                model=model, dims=dims, vectors=np.concatenate([p.vectors for p in parts]))
