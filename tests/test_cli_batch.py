"""The batch CLI end to end, as a user runs it: `submit-batch` → Pub/Sub emulator → `worker` →
storage server → `status` and `results`, on the real model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.fixtures.pipeline import WorkerProcess, new_topic
from tests.fixtures.services import TEST_PROJECT

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def _batch_lines(docstrings: list[str]) -> list[dict]:
    """210 mixed tasks: OpenAI embedding, completion and chat lines, and native envelopes."""
    lines: list[dict] = []
    for i in range(210):
        custom_id = f"req {i}"  # not a safe id on purpose: the CLI derives a task id
        if i % 10 == 3:
            lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                          "body": {"prompt": f"Item {i}: the number after {i} is", "max_tokens": 4}})
        elif i % 10 == 7:
            lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                          "body": {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 4}})
        elif i % 10 == 5:
            lines.append({"kind": "embed", "custom_id": custom_id, "payload": {"texts": [docstrings[i][:400]], "dims": 64}})
        else:
            lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                          "body": {"input": docstrings[i][:400]}})
    return lines


def test_batch_of_210_mixed_tasks_ends_with_one_result_each_in_input_order(
        pubsub_emulator, storage_server, gcs_bucket: str, tmp_path: Path, docstrings: list[str]) -> None:
    # Given a running worker and a batch file of 210 mixed tasks
    topic, subscription = new_topic(TEST_PROJECT)
    results = f"gs://{gcs_bucket}/results"
    lines = _batch_lines(docstrings)
    batch_file = tmp_path / "batch.jsonl"
    batch_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    worker = WorkerProcess(subscription=subscription, results=results, log_path=tmp_path / "worker.log")
    try:
        worker.wait_ready()
        # When submitted through the CLI with --wait
        submitted = run_cli("submit-batch", str(batch_file), "--topic", topic, "--results", results,
                            "--batch-id", "e2e-1", "--wait", "--timeout", "400", timeout=500)
        assert submitted.returncode == 0, submitted.stderr
        assert submitted.stdout.strip() == "e2e-1"
        status = run_cli("status", "e2e-1", "--results", results, "--json")
    finally:
        worker.stop()
    # Then status reports every task done without errors
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert (counts["total"], counts["ok"], counts["error"], counts["pending"]) == (210, 210, 0, 0)
    # And `results` writes one OpenAI-style line per task, in input order, custom_id echoed
    out = tmp_path / "out.jsonl"
    collected = run_cli("results", "e2e-1", "--results", results, "-o", str(out))
    assert collected.returncode == 0, collected.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [line["custom_id"] for line in lines]
    for line, row in zip(lines, rows):
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        if line.get("url") == "/v1/embeddings":
            assert len(body["data"][0]["embedding"]) == 640
        elif line.get("url") == "/v1/completions":
            assert body["object"] == "text_completion" and body["choices"][0]["text"]
        elif line.get("url") == "/v1/chat/completions":
            assert body["choices"][0]["message"]["role"] == "assistant"
        else:
            assert len(body["embeddings"][0]) == 64
    # And the store holds exactly one object per task beside the batch record
    listed = run_cli("status", "e2e-1", "--results", results)
    assert "pending 0" in listed.stdout


def test_a_bad_line_stops_the_whole_batch_unless_skipped(pubsub_emulator, storage_server, gcs_bucket: str,
                                                         tmp_path: Path) -> None:
    # Given a file whose second line has an empty input
    topic, _ = new_topic(TEST_PROJECT)
    results = f"gs://{gcs_bucket}/results"
    batch_file = tmp_path / "bad.jsonl"
    batch_file.write_text(
        json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "fine"}}) + "\n"
        + json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"input": ""}}) + "\n")
    # When submitted / Then the line is reported with its number and code, and nothing is published
    refused = run_cli("submit-batch", str(batch_file), "--topic", topic, "--results", results, "--batch-id", "bad-1")
    assert refused.returncode == 2
    assert f"{batch_file}:2: [empty_input]" in refused.stderr and "nothing was published" in refused.stderr
    assert run_cli("status", "bad-1", "--results", results).returncode == 2
    # When submitted with --skip-invalid / Then the good line is recorded and published
    skipped = run_cli("submit-batch", str(batch_file), "--topic", topic, "--results", results,
                      "--batch-id", "bad-2", "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert "total 1 " in run_cli("status", "bad-2", "--results", results).stdout
