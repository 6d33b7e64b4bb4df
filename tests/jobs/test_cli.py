"""`reembed`, `reembed-task` and `reembed-status` as a user runs them, in fresh processes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.jobs.helpers import corpus_nodes, jsonl_bytes, run_vectors, write_nodes
from worker.engine import Engine
from worker.store import LocalStore


@pytest.mark.parametrize("command", ["reembed", "reembed-task", "reembed-status"])
def test_reembed_commands_have_help(command: str) -> None:
    # Given the CLI / When asked for a command's help / Then it explains the command and exits 0
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "--out" in result.stdout


@pytest.mark.slow
def test_reembed_runs_task_processes_retries_them_and_status_shows_the_run(engine: Engine, tmp_path: Path) -> None:
    # Given 16 real nodes, split 10/6 over two tasks, and a 1-second task timeout that model loading
    # alone exceeds, so a task may write one 6-row checkpoint per attempt
    nodes = corpus_nodes(16)
    src = write_nodes(tmp_path / "nodes", nodes, files=2)
    out = tmp_path / "out"
    # When the job runs locally with 2 task processes
    result = run_cli("reembed", "--nodes", str(src), "--out", str(out), "--tasks", "2", "--device", "cpu",
                     "--run-id", "local-1", "--chunk-rows", "6", "--task-timeout", "1", "--timeout-margin", "0",
                     "--progress-interval", "1")
    # Then the 10-row task was retried once (exit 75, then attempt 1) and the run finished
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["run_id"] == "local-1" and summary["retries"] == {"0": 1}
    assert (summary["nodes"], summary["embedded"], summary["reused"], summary["invalid"]) == (16, 16, 0, 0)
    assert "progress: 16/16 rows (100%)" in result.stderr
    # And its vectors are the engine's
    got = run_vectors(LocalStore(out), "local-1")
    want = engine.embed([n["text"] for n in nodes]).vectors
    assert min(float(np.dot(got[n["id"]][1], want[i])) for i, n in enumerate(nodes)) >= 0.9999
    # When the status is asked for
    status = run_cli("reembed-status", "--out", str(out))
    progress = run_cli("reembed-status", "--out", str(out), "--run", "local-1")
    # Then it names the latest run with its manifest, and the run's progress
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["latest"]["run_id"] == "local-1" and shown["manifest"]["node_count"] == 16
    assert json.loads(progress.stdout)["rows_planned"] == 16


def test_reembed_strict_fails_naming_the_bad_line(tmp_path: Path) -> None:
    # Given a node file whose third line is not JSON
    src = tmp_path / "nodes.jsonl"
    src.write_bytes(jsonl_bytes(corpus_nodes(2)) + b"{oops\n")
    # When it is re-embedded with --strict
    result = run_cli("reembed", "--nodes", str(src), "--out", str(tmp_path / "out"), "--strict", "--device", "cpu")
    # Then it fails with the code, the file and line, and nothing was published
    assert result.returncode == 2
    assert "[invalid_nodes]" in result.stderr and f"{src}:3: not valid JSON" in result.stderr
    assert not (tmp_path / "out" / "latest").exists()


def test_reembed_status_without_runs_says_what_to_do(tmp_path: Path) -> None:
    # Given an empty output location / When its status is asked for / Then one clear line and status 2
    result = run_cli("reembed-status", "--out", str(tmp_path / "empty"))
    assert result.returncode == 2 and "no finished run" in result.stderr and "Traceback" not in result.stderr
