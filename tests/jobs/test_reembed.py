"""jobs/reembed.py against the real Gemma, a real directory and a real fake-gcs-server."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from jobs.errors import JobError
from jobs.nodes import shard_of
from jobs.parts import RunLayout, decode_rows
from jobs.reembed import JobConfig, TaskEnv, run_task
from jobs.runs import RunSpec, finalise, read_latest, read_manifest
from tests.jobs.helpers import (corpus_nodes, jsonl_bytes, min_cosine, parquet_bytes, run_all_tasks, run_vectors,
                                write_nodes)
from worker.engine import Engine
from worker.store import GCSStore, LocalStore

if TYPE_CHECKING:
    from google.cloud import storage


@pytest.mark.slow
def test_shards_hold_every_valid_node_once_and_match_a_single_task_run(engine: Engine, tmp_path: Path) -> None:
    # Given 40 real nodes spread over two JSONL files and one Parquet file in one directory
    nodes = corpus_nodes(40)
    src = write_nodes(tmp_path / "nodes", nodes[:28], files=2)
    (src / "nodes-extra.parquet").write_bytes(parquet_bytes(nodes[28:]))
    store = LocalStore(tmp_path / "out")
    # When the same nodes are re-embedded by 1, 3 and 4 tasks (tasks run out of order)
    manifests, vectors = {}, {}
    for tasks in (1, 3, 4):
        config = JobConfig(nodes=str(src), out=str(tmp_path / "out"), run_id=f"tasks-{tasks}", previous="none",
                           chunk_rows=16)
        run_all_tasks(config, tasks=tasks, engine=engine, order=list(range(tasks))[::-1])
        manifests[tasks] = read_manifest(store, f"tasks-{tasks}")
        vectors[tasks] = run_vectors(store, f"tasks-{tasks}")
    # Then every node is in exactly one shard, the one its id hashes to, in id order
    for tasks, manifest in manifests.items():
        assert manifest["node_count"] == 40 and manifest["embedded"] == 40 and manifest["invalid"]["count"] == 0
        assert [s["rows"] for s in manifest["shards"]] == [
            sum(1 for n in nodes if shard_of(n["id"], tasks) == i) for i in range(tasks)]
        for i in range(tasks):
            rows, _ = decode_rows(store.get(RunLayout(f"tasks-{tasks}").part(i)) or b"", where="part")
            assert rows.ids == sorted(rows.ids) and all(shard_of(x, tasks) == i for x in rows.ids)
        assert sorted(vectors[tasks]) == sorted(n["id"] for n in nodes)
    # And the vectors equal the single-task run's
    assert min_cosine(vectors[1], vectors[3]) >= 0.9999
    assert min_cosine(vectors[1], vectors[4]) >= 0.9999


@pytest.mark.slow
def test_incremental_run_embeds_only_changed_nodes_and_equals_a_full_run(engine: Engine, tmp_path: Path) -> None:
    # Given a finished run over 40 nodes, then 10% of their texts changed
    nodes = corpus_nodes(40)
    out = tmp_path / "out"
    store = LocalStore(out)
    first = write_nodes(tmp_path / "v1", nodes)
    run_all_tasks(JobConfig(nodes=str(first), out=str(out), run_id="day-1", chunk_rows=16), tasks=2, engine=engine)
    changed = {n["id"] for n in nodes[::10]}
    edited = [{**n, "text": n["text"] + " (revised)"} if n["id"] in changed else n for n in nodes]
    second = write_nodes(tmp_path / "v2", edited)
    # When re-runs reuse the latest run (same and different task counts) and a full run embeds everything
    same = run_all_tasks(JobConfig(nodes=str(second), out=str(out), run_id="day-2", chunk_rows=16),
                         tasks=2, engine=engine)
    regrouped = run_all_tasks(JobConfig(nodes=str(second), out=str(out), run_id="day-2b", previous="day-1",
                                        chunk_rows=16), tasks=3, engine=engine)
    run_all_tasks(JobConfig(nodes=str(second), out=str(out), run_id="full", previous="none", chunk_rows=16),
                  tasks=1, engine=engine)
    # Then only the 4 changed nodes were embedded, the rest reused, as the summaries and manifests say
    for run_id, summaries in (("day-2", same), ("day-2b", regrouped)):
        assert sum(s.embedded for s in summaries) == 4 and sum(s.reused for s in summaries) == 36
        manifest = read_manifest(store, run_id)
        assert (manifest["embedded"], manifest["reused"], manifest["previous"]) == (4, 36, "day-1")
    # And the incremental results equal the full re-run's
    full = run_vectors(store, "full")
    for run_id in ("day-2", "day-2b"):
        got = run_vectors(store, run_id)
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in full.items()}
        assert min_cosine(got, full) >= 0.9999
    assert read_latest(store)["run_id"] == "full"


def test_invalid_lines_are_counted_once_with_file_and_line(engine: Engine, tmp_path: Path) -> None:
    # Given a JSONL file and a Parquet file holding 8 valid nodes and 8 invalid lines
    nodes = corpus_nodes(8)
    src = tmp_path / "nodes"
    src.mkdir()
    lines = [json.dumps(nodes[0]), "{not json", json.dumps([1, 2]), json.dumps({"text": "no id"}),
             json.dumps({"id": "blank", "text": "   "}), json.dumps({"id": "num", "text": 7}), "",
             json.dumps(nodes[1]), json.dumps({**nodes[0], "text": "a duplicate id"})]
    (src / "a.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"id": "x", "text": "\xff"}\n')
    (src / "b.parquet").write_bytes(parquet_bytes(nodes[2:] + [{"id": "null-text", "text": None, "kind": "x",
                                                                 "weight": 0}]))
    config = JobConfig(nodes=str(src), out=str(tmp_path / "out"), run_id="r1", previous="none")
    # When three tasks run over them
    summaries = run_all_tasks(config, tasks=3, engine=engine)
    # Then each invalid line is counted once, by file and line (Parquet: row), and the valid nodes are embedded
    manifest = read_manifest(LocalStore(tmp_path / "out"), "r1")
    a, b = str(src / "a.jsonl"), str(src / "b.parquet")
    assert [(x["source"], x["line"]) for x in manifest["invalid"]["lines"]] == [
        (a, 2), (a, 3), (a, 4), (a, 5), (a, 6), (a, 9), (a, 10), (b, 7)]
    assert manifest["invalid"]["count"] == sum(s.invalid for s in summaries) == 8
    assert "duplicate id 'node-0000'" in manifest["invalid"]["lines"][5]["reason"]
    assert manifest["node_count"] == 8 and manifest["input_lines"] == 16
    # And with --strict the task fails, naming the first bad line, before writing anything
    with pytest.raises(JobError) as failed:
        run_task(JobConfig(nodes=str(src), out=str(tmp_path / "strict"), run_id="r2", strict=True), TaskEnv(),
                 engine_factory=lambda: engine)
    assert failed.value.code == "invalid_nodes" and f"{a}:2: not valid JSON" in failed.value.message
    assert not failed.value.retryable and not (tmp_path / "strict").exists()


@pytest.mark.emulator
def test_readers_of_latest_only_ever_see_runs_with_a_manifest(engine: Engine, gcs_client: storage.Client,
                                                              gcs_bucket: str) -> None:
    # Given nodes as a JSONL and a Parquet object under one gs:// prefix, and a reader polling `latest`
    nodes = corpus_nodes(24)
    GCSStore(gcs_bucket, "graph", client=gcs_client).put("nodes/a.jsonl", jsonl_bytes(nodes[:12]))
    GCSStore(gcs_bucket, "graph", client=gcs_client).put("nodes/b.parquet", parquet_bytes(nodes[12:]))
    out = f"gs://{gcs_bucket}/embeddings"
    store = GCSStore(gcs_bucket, "embeddings", client=gcs_client)
    seen, broken, stop = [], [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            pointer = read_latest(store)
            if pointer:
                seen.append(pointer["run_id"])
                if read_manifest(store, pointer["run_id"]) is None:
                    broken.append(pointer["run_id"])
            time.sleep(0.01)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    config = JobConfig(nodes=f"gs://{gcs_bucket}/graph/nodes/", out=out, run_id="night-1", chunk_rows=8)
    try:
        # When only one of two tasks has finished
        run_task(config, TaskEnv(index=0, count=2), engine_factory=lambda: engine, client=gcs_client)
        # Then there is no manifest and `latest` does not exist yet, and the written shard's
        # checkpoints are deleted
        assert read_latest(store) is None and read_manifest(store, "night-1") is None
        assert store.exists("night-1/part-00000.parquet") and list(store.list("night-1/_chunks/")) == []
        # When the second task finishes, then a second run (all reused), then the first run finalises again
        last = run_task(config, TaskEnv(index=1, count=2), engine_factory=lambda: engine, client=gcs_client)
        second = run_all_tasks(JobConfig(nodes=config.nodes, out=out, run_id="night-2"), tasks=2, engine=engine,
                               client=gcs_client)
        spec = RunSpec(**json.loads(store.get("night-1/_RUN.json") or b"{}"))
        again = finalise(store, spec)
    finally:
        stop.set()
        thread.join()
    # Then the last task finalised, readers only saw complete runs, and `latest` never went back
    assert last.finalised and sum(s.reused for s in second) == 24 and sum(s.embedded for s in second) == 0
    assert again == read_manifest(store, "night-1")
    assert read_latest(store)["run_id"] == "night-2" and broken == []
    assert list(store.list("night-1/_chunks/")) == list(store.list("night-2/_chunks/")) == []
    assert seen and seen == sorted(seen)
