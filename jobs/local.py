"""Run a re-embedding job on this machine the way Cloud Run does: N task processes with the
CLOUD_RUN_TASK_* environment, a failed task retried with the next attempt number, one run id."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from jobs.errors import JobError
from jobs.progress import RunCounts, run_counts
from jobs.reembed import EXIT_FATAL, JobConfig
from jobs.runs import read_manifest
from worker.store import open_store

if TYPE_CHECKING:
    from google.cloud import storage


def task_args(config: JobConfig) -> list[str]:
    """The `reembed-task` flags that give a task process this run's options."""
    args = ["--nodes", config.nodes, "--out", config.out, "--run-id", config.run_id, "--id-field", config.id_field,
            "--text-field", config.text_field, "--chunk-rows", str(config.chunk_rows),
            "--progress-interval", str(config.progress_interval_s)]
    optional = {"--previous": config.previous, "--dims": config.dims, "--task-timeout": config.task_timeout_s,
                "--timeout-margin": config.timeout_margin_s}
    args += [part for flag, value in optional.items() if value is not None for part in (flag, str(value))]
    return args + (["--strict"] if config.strict else [])


@dataclass
class _Task:
    index: int
    attempt: int = 0
    process: subprocess.Popen[bytes] | None = None
    stdout: IO[bytes] | None = None
    stderr_path: Path | None = None
    summary: dict[str, Any] | None = None
    history: list[int] = field(default_factory=list)  # exit status of each attempt


@dataclass(frozen=True)
class LocalRun:
    run_id: str
    manifest: dict[str, Any]
    attempts: dict[int, list[int]]  # task index -> exit status per attempt


def run_local(config: JobConfig, *, task_command: Sequence[str], tasks: int, max_retries: int = 3,
              env: Mapping[str, str] | None = None, on_progress: Callable[[RunCounts], None] | None = None,
              poll_s: float = 0.5, client: storage.Client | None = None) -> LocalRun:
    """Start every task, retry failed ones up to max_retries, and return the run's manifest."""
    store = open_store(config.out, client=client)
    base_env = {**os.environ, **(env or {})}
    # Tasks share this machine's cores; without this each would start a thread per core.
    base_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tasks)))
    with tempfile.TemporaryDirectory(prefix="reembed-") as tmp:
        state = [_Task(index=i) for i in range(tasks)]
        try:
            for t in state:
                _start(t, command=[*task_command, *task_args(config)], env=base_env, tasks=tasks, logs=Path(tmp))
            while any(t.process is not None for t in state):
                time.sleep(poll_s)
                for t in state:
                    _reap(t, max_retries=max_retries, command=[*task_command, *task_args(config)], env=base_env,
                          tasks=tasks, logs=Path(tmp))
                if on_progress:
                    on_progress(run_counts(store, run_id=config.run_id, task_count=tasks))
            if on_progress:  # the final state, even if the last tasks ended between two polls
                on_progress(run_counts(store, run_id=config.run_id, task_count=tasks))
        finally:
            _stop_all(state)
    manifest = read_manifest(store, config.run_id)
    if manifest is None:
        raise JobError("run_not_finalised", f"every task finished but {store.uri(config.run_id)} has no manifest; "
                       "run the same command again with --run-id " + config.run_id, retryable=True)
    return LocalRun(run_id=config.run_id, manifest=manifest, attempts={t.index: t.history for t in state})


def _start(task: _Task, *, command: list[str], env: dict[str, str], tasks: int, logs: Path) -> None:
    task.stderr_path = logs / f"task-{task.index}-attempt-{task.attempt}.log"
    task.stdout = open(logs / f"task-{task.index}-attempt-{task.attempt}.out", "w+b")  # noqa: SIM115
    with open(task.stderr_path, "wb") as stderr:
        task.process = subprocess.Popen(command, stdout=task.stdout, stderr=stderr, stdin=subprocess.DEVNULL, env={
            **env, "CLOUD_RUN_TASK_INDEX": str(task.index), "CLOUD_RUN_TASK_COUNT": str(tasks),
            "CLOUD_RUN_TASK_ATTEMPT": str(task.attempt)})


def _reap(task: _Task, *, max_retries: int, command: list[str], env: dict[str, str], tasks: int, logs: Path) -> None:
    """Collect a finished task; retry it like Cloud Run would, or raise once it can no longer succeed."""
    if task.process is None or (status := task.process.poll()) is None:
        return
    task.process = None
    task.history.append(status)
    assert task.stdout is not None
    task.stdout.seek(0)
    lines = [line for line in task.stdout.read().decode(errors="replace").splitlines() if line.startswith("{")]
    task.stdout.close()
    task.summary = json.loads(lines[-1]) if lines else None
    if status == 0:
        return
    if status == EXIT_FATAL or task.attempt >= max_retries:
        raise JobError(task.summary.get("code", "task_failed") if task.summary else "task_failed",
                       _failure(task, status), retryable=False)
    task.attempt += 1
    _start(task, command=command, env=env, tasks=tasks, logs=logs)


def _failure(task: _Task, status: int) -> str:
    if task.summary and "message" in task.summary:
        detail = task.summary["message"]
    else:
        tail = (task.stderr_path.read_text(errors="replace") if task.stderr_path else "").strip().splitlines()[-5:]
        detail = " | ".join(tail) or "no output"
    return f"task {task.index} failed on attempt {task.attempt} (exit status {status}): {detail}"


def _stop_all(state: list[_Task]) -> None:
    """Ends the task processes this runner started (and only those) when it stops early."""
    for t in state:
        if t.process is not None and t.process.poll() is None:
            t.process.terminate()
    for t in state:
        if t.process is not None:
            try:
                t.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                t.process.kill()
                t.process.wait()
        if t.stdout is not None and not t.stdout.closed:
            t.stdout.close()
