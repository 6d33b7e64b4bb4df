"""Knowledge-graph nodes in: JSONL or Parquet, one file or a prefix of files, local or `gs://`.

Every task reads every file (a node's shard is a hash of its id, not its position), keeps its own
shard, and counts the lines it cannot use with their file and line number.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import JobError

if TYPE_CHECKING:
    from google.cloud import storage

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Node:
    id: str
    text: str
    content_sha256: str


@dataclass(frozen=True, order=True)
class InvalidLine:
    """One input line (JSONL) or row (Parquet, 1-based) that was skipped, and why."""

    source: str
    line: int
    reason: str
    node_id: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason}


@dataclass(frozen=True)
class NodeRead:
    nodes: list[Node]  # the kept ones, in input order
    invalid: list[InvalidLine]
    files: list[str]
    lines: int  # non-blank lines and rows seen, valid or not


def stable_hash(key: str) -> int:
    """First 8 bytes of sha256, so a node's shard never depends on file order or the process."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def shard_of(node_id: str, count: int) -> int:
    return stable_hash(node_id) % count


def content_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def node_files(location: str, *, client: storage.Client | None = None) -> list[tuple[str, Callable[[], bytes]]]:
    """(uri, read) per input file: the file itself, or every JSONL/Parquet file under the prefix, sorted."""
    if location.startswith("gs://"):
        return _gcs_files(location, client=client)
    path = Path(location)
    if path.is_file():
        return [(str(path), path.read_bytes)]
    if path.is_dir():
        candidates = path.rglob("*")
    else:  # a path prefix such as exports/nodes- matches exports/nodes-0001.jsonl
        candidates = (p for p in path.parent.glob(path.name + "*") if p.is_file() or p.is_dir())
        candidates = (f for c in candidates for f in ([c] if c.is_file() else c.rglob("*")))
    found = sorted(p for p in candidates if p.is_file() and p.name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES))
    if not found:
        raise JobError("nodes_not_found", f"no .jsonl or .parquet files at {location}; pass a file, a directory "
                       "or a path prefix that holds node files")
    return [(str(p), p.read_bytes) for p in found]


def _gcs_files(location: str, *, client: storage.Client | None) -> list[tuple[str, Callable[[], bytes]]]:
    from worker.store import open_store

    bucket, _, name = location.removeprefix("gs://").partition("/")
    store = open_store(f"gs://{bucket}", client=client)

    def reader(object_name: str) -> Callable[[], bytes]:
        def read() -> bytes:
            data = store.get(object_name)
            if data is None:
                raise JobError("nodes_changed", f"{store.uri(object_name)} disappeared while the job read it; "
                               "run again once the export is complete", retryable=True)
            return data
        return read

    if name and not name.endswith("/") and store.exists(name):
        return [(store.uri(name), reader(name))]
    names = [n for n in store.list(name) if n.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)]
    if not names:
        raise JobError("nodes_not_found", f"no .jsonl or .parquet objects under {location}; check the bucket and prefix")
    return [(store.uri(n), reader(n)) for n in names]


def read_nodes(location: str, *, id_field: str = "id", text_field: str = "text",
               keep: Callable[[str], bool] = lambda _id: True, client: storage.Client | None = None) -> NodeRead:
    """Valid nodes whose id passes `keep`, and every invalid line (all of them, kept shard or not).

    A repeated id is invalid from its second occurrence on; ids repeat only within one shard,
    so each task sees all duplicates of the nodes it keeps."""
    nodes: list[Node] = []
    invalid: list[InvalidLine] = []
    first_seen: dict[str, str] = {}
    files = node_files(location, client=client)
    lines = 0
    for uri, read in files:
        for line, record in _records(uri, read(), id_field=id_field, text_field=text_field):
            lines += 1
            node_id, problem = _check(record, id_field=id_field, text_field=text_field)
            if problem:
                invalid.append(InvalidLine(uri, line, problem, node_id))
                continue
            assert node_id is not None
            if not keep(node_id):
                continue
            if node_id in first_seen:
                invalid.append(InvalidLine(uri, line, f"duplicate id {node_id!r} (first at {first_seen[node_id]})",
                                           node_id))
                continue
            first_seen[node_id] = f"{uri}:{line}"
            text = record[text_field]
            nodes.append(Node(id=node_id, text=text, content_sha256=content_sha256(text)))
    return NodeRead(nodes=nodes, invalid=invalid, files=[uri for uri, _ in files], lines=lines)


def _check(record: Any, *, id_field: str, text_field: str) -> tuple[str | None, str | None]:
    """(id, None) for a usable record, else (id if readable, reason)."""
    if isinstance(record, str):
        return None, record  # the reader's own parse error
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    raw_id = record.get(id_field)
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if not isinstance(raw_id, str) or not raw_id:
        what = "missing" if raw_id is None else f"not a non-empty string or integer ({raw_id!r:.40})"
        return None, f"field {id_field!r} is {what}"
    text = record.get(text_field)
    if not isinstance(text, str) or not text.strip():
        what = "missing" if text is None else ("blank" if isinstance(text, str) else f"a {type(text).__name__}")
        return raw_id, f"field {text_field!r} is {what}, not a non-empty string"
    return raw_id, None


def _records(uri: str, data: bytes, *, id_field: str, text_field: str) -> Iterator[tuple[int, Any]]:
    """(line or row number, parsed record or a parse-error string) for one file."""
    if uri.lower().endswith(PARQUET_SUFFIXES):
        yield from _parquet_records(uri, data, columns=[id_field, text_field])
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield number, "not valid UTF-8"
        except json.JSONDecodeError as exc:
            yield number, f"not valid JSON ({exc.msg} at column {exc.colno})"


def _parquet_records(uri: str, data: bytes, *, columns: list[str]) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise JobError("invalid_nodes_file", f"{uri} is not a readable Parquet file ({exc})") from None
    names = reader.schema_arrow.names
    missing = [c for c in dict.fromkeys(columns) if c not in names]
    if missing:
        raise JobError("invalid_nodes_file", f"{uri} has no column {missing[0]!r}; its columns are {names}. "
                       "Pass --id-field/--text-field to name the right ones")
    row = 0
    for batch in reader.iter_batches(columns=list(dict.fromkeys(columns)), batch_size=65536):
        for record in batch.to_pylist():
            row += 1
            yield row, record
