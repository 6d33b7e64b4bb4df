"""Reading nodes: shards follow ids, not files; prefixes, integer ids and empty shards work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.errors import JobError
from jobs.nodes import read_nodes, shard_of
from jobs.reembed import JobConfig
from jobs.runs import read_run
from tests.jobs.helpers import corpus_nodes, jsonl_bytes, run_all_tasks
from worker.engine import Engine
from worker.store import LocalStore


def test_a_node_keeps_its_shard_when_files_are_reordered_or_split(tmp_path: Path) -> None:
    # Given the same 40 nodes as one file, and reversed over three files matched by a path prefix
    nodes = corpus_nodes(40)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "all.jsonl").write_bytes(jsonl_bytes(nodes))
    for i in range(3):
        (tmp_path / f"split-{i}.jsonl").write_bytes(jsonl_bytes(nodes[::-1][i::3]))
    (tmp_path / "split-notes.txt").write_text("not a node file")
    # When each of 3 shards is read from both
    def shard(location: str, index: int) -> list[str]:
        return sorted(n.id for n in read_nodes(location, keep=lambda i: shard_of(i, 3) == index).nodes)
    # Then every shard holds the same ids either way, and together they hold every node once
    shards = [shard(str(tmp_path / "one"), i) for i in range(3)]
    assert shards == [shard(str(tmp_path / "split-"), i) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(n["id"] for n in nodes)


def test_integer_ids_and_custom_fields_are_read_and_missing_input_is_clear(tmp_path: Path) -> None:
    # Given nodes keyed by integer "key" with their text in "body"
    src = tmp_path / "nodes.jsonl"
    src.write_text("\n".join(json.dumps({"key": i, "body": f"node number {i}"}) for i in range(3)))
    # When they are read with --id-field key --text-field body
    read = read_nodes(str(src), id_field="key", text_field="body")
    # Then ids become strings, and a location with no node files is a clear error
    assert [n.id for n in read.nodes] == ["0", "1", "2"] and read.invalid == []
    with pytest.raises(JobError, match="nodes_not_found"):
        read_nodes(str(tmp_path / "missing"))


def test_a_run_with_more_tasks_than_nodes_publishes_empty_shards(engine: Engine, tmp_path: Path) -> None:
    # Given 3 nodes and 5 tasks, so some shards are empty
    src = tmp_path / "nodes.jsonl"
    src.write_bytes(jsonl_bytes(corpus_nodes(3)))
    # When the run completes
    run_all_tasks(JobConfig(nodes=str(src), out=str(tmp_path / "out"), run_id="tiny"), tasks=5, engine=engine)
    # Then the manifest counts 3 nodes over 5 shards, some with no rows, and readers get all 3
    manifest, rows = read_run(LocalStore(tmp_path / "out"))
    assert manifest["node_count"] == 3 and len(manifest["shards"]) == 5
    assert 0 in [s["rows"] for s in manifest["shards"]] and len(rows) == 3 and rows.vectors.shape == (3, 640)
