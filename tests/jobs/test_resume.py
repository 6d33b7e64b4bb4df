"""A task that is killed or runs out of time resumes from its checkpoints to the rows of an uninterrupted run."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.errors import JobError
from jobs.parts import decode_rows
from jobs.reembed import JobConfig, TaskEnv, run_task
from jobs.progress import RunCounts, run_counts
from jobs.runs import read_manifest, run_status
from tests.conftest import REPO
from tests.jobs.helpers import corpus_nodes, without_timing, write_nodes
from worker.engine import Engine
from worker.store import LocalStore


def start_task(*, nodes: Path, out: Path, attempt: int, logs: Path) -> subprocess.Popen[bytes]:
    """`cli.py reembed-task` as Cloud Run starts it: task 0 of 1, with the attempt number in the environment."""
    env = {**os.environ, "CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "1",
           "CLOUD_RUN_TASK_ATTEMPT": str(attempt), "CLOUD_RUN_EXECUTION": "nightly-abc12"}
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"out-{attempt}", "wb") as stdout, open(logs / f"err-{attempt}", "wb") as stderr:
        return subprocess.Popen([sys.executable, str(REPO / "cli.py"), "reembed-task", "--nodes", str(nodes),
                                 "--out", str(out), "--chunk-rows", "3", "--previous", "none", "--device", "cpu"],
                                stdout=stdout, stderr=stderr, env=env, cwd=REPO)


def without_checksums(manifest: dict) -> dict:
    return {**without_timing(manifest),
            "shards": [{k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in manifest["shards"]]}


def summary_line(logs: Path, attempt: int) -> dict:
    return json.loads((logs / f"out-{attempt}").read_text().strip().splitlines()[-1])


@pytest.mark.slow
def test_task_killed_mid_shard_resumes_on_the_next_attempt_to_the_rows_of_an_uninterrupted_run(engine: Engine, tmp_path: Path) -> None:
    # Given 24 real nodes and a task process working through them, 3 rows a checkpoint
    nodes = write_nodes(tmp_path / "nodes", corpus_nodes(24))
    victim = start_task(nodes=nodes, out=tmp_path / "out", attempt=0, logs=tmp_path / "logs")
    chunks = tmp_path / "out" / "nightly-abc12" / "_chunks"
    # When the task is SIGKILLed right after its first checkpoint
    deadline = time.monotonic() + 240
    while not (chunks.is_dir() and any(chunks.glob("*.parquet"))):
        assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "logs" / "err-0").read_text()
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    kept = {p.name: p.read_bytes() for p in chunks.glob("*.parquet")}  # a write cut short leaves a hidden temp file
    # Then it stopped mid-shard: some checkpoints, no part
    assert 1 <= len(kept) < 8 and not (tmp_path / "out" / "nightly-abc12" / "part-00000.parquet").exists()
    # When Cloud Run retries it as attempt 1, and the same run goes uninterrupted elsewhere
    retry = start_task(nodes=nodes, out=tmp_path / "out", attempt=1, logs=tmp_path / "logs")
    run_task(JobConfig(nodes=str(nodes), out=str(tmp_path / "baseline"), run_id="nightly-abc12", previous="none",
                       chunk_rows=3), TaskEnv(), engine_factory=lambda: engine)
    assert retry.wait(timeout=300) == 0, (tmp_path / "logs" / "err-1").read_text()
    # Then it continued from the checkpoints: their rows are in the part exactly as attempt 0 wrote them
    summary = summary_line(tmp_path / "logs", 1)
    assert summary["event"] == "task_done" and summary["chunks_resumed"] == len(kept) and summary["finalised"]
    part, _ = decode_rows((tmp_path / "out" / "nightly-abc12" / "part-00000.parquet").read_bytes(), where="part")
    for name, data in kept.items():
        chunk, _ = decode_rows(data, where=name)
        start = part.ids.index(chunk.ids[0])
        assert part.ids[start:start + 3] == chunk.ids and (part.vectors[start:start + 3] == chunk.vectors).all()
    # and the run equals the uninterrupted one: same manifest (but for the part's checksum: two
    # processes' float kernels need not round alike) and every row's vector to float rounding
    got = read_manifest(LocalStore(tmp_path / "out"), "nightly-abc12")
    want = read_manifest(LocalStore(tmp_path / "baseline"), "nightly-abc12")
    assert without_checksums(got) == without_checksums(want) and got["node_count"] == 24
    baseline, _ = decode_rows((tmp_path / "baseline" / "nightly-abc12" / "part-00000.parquet").read_bytes(),
                              where="baseline")
    assert part.ids == baseline.ids and part.content_sha256 == baseline.content_sha256
    np.testing.assert_allclose(part.vectors, baseline.vectors, rtol=0, atol=1e-5)
    # And the finished shard's checkpoints are gone (its part holds their rows)
    assert not any(chunks.glob("*.parquet"))


def test_task_out_of_time_checkpoints_and_exits_then_a_retry_finishes(engine: Engine, tmp_path: Path) -> None:
    # Given a task whose 1-second budget was already spent (say, on loading the model)
    nodes = write_nodes(tmp_path / "nodes", corpus_nodes(16))
    config = JobConfig(nodes=str(nodes), out=str(tmp_path / "out"), run_id="r", previous="none", chunk_rows=4,
                       task_timeout_s=1.0)
    # When it runs
    with pytest.raises(JobError) as stopped:
        run_task(config, TaskEnv(attempt=0), engine_factory=lambda: engine, started=time.monotonic() - 5)
    # Then it wrote one checkpoint (every attempt makes progress) and stopped with a retryable error
    assert stopped.value.code == "time_budget_exhausted" and stopped.value.retryable
    assert len(list((tmp_path / "out" / "r" / "_chunks").glob("*.parquet"))) == 1
    store = LocalStore(tmp_path / "out")
    assert run_counts(store, run_id="r", task_count=1) == RunCounts(done=4, total=16, shards_done=0)
    # When the retry runs with time to spare, next to an uninterrupted run
    resumed = run_task(dataclasses.replace(config, task_timeout_s=None), TaskEnv(attempt=1),
                       engine_factory=lambda: engine)
    run_task(dataclasses.replace(config, out=str(tmp_path / "baseline"), task_timeout_s=None), TaskEnv(),
             engine_factory=lambda: engine)
    # Then it resumed after the checkpoint and the manifests (checksums included) are identical
    assert (resumed.chunks_resumed, resumed.embedded, resumed.finalised) == (1, 16, True)
    assert without_timing(read_manifest(LocalStore(tmp_path / "out"), "r")) == without_timing(
        read_manifest(LocalStore(tmp_path / "baseline"), "r"))
    # And its checkpoints were deleted once the part existed, while progress still counts every row
    assert list(store.list("r/_chunks/")) == []
    assert run_counts(store, run_id="r", task_count=1) == RunCounts(done=16, total=16, shards_done=1)
    assert run_status(store, "r")["chunks_done"] == 4


def test_a_retry_after_the_shard_was_written_deletes_checkpoints_left_behind(engine: Engine, tmp_path: Path) -> None:
    # Given a finished one-task run, and a checkpoint left behind as if the attempt that wrote the
    # part had died before deleting its chunks
    nodes = write_nodes(tmp_path / "nodes", corpus_nodes(8))
    config = JobConfig(nodes=str(nodes), out=str(tmp_path / "out"), run_id="r", previous="none", chunk_rows=4)
    run_task(config, TaskEnv(attempt=0), engine_factory=lambda: engine)
    store = LocalStore(tmp_path / "out")
    part = store.get("r/part-00000.parquet")
    assert part is not None and store.put_if_absent("r/_chunks/part-00000-000000004.parquet", b"left behind")
    # When Cloud Run retries the task
    again = run_task(config, TaskEnv(attempt=1), engine_factory=lambda: pytest.fail("the retry loaded the model"))
    # Then it only finalised (no chunk work, no model), deleted the leftover, and the part is unchanged
    assert (again.chunks, again.chunks_resumed, again.rows, again.finalised) == (0, 0, 8, True)
    assert list(store.list("r/_chunks/")) == [] and store.get("r/part-00000.parquet") == part
