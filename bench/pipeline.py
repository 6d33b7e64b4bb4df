"""Pipeline efficiency, cold start and memory, from one worker process on loopback services.

A real `cli.py worker` child process is started against the Pub/Sub emulator and the storage server
(fake-gcs-server), as `make demo` does. Measured:
  - cold start: process start to the worker's "pulling from" line (model loaded from the prepared
    cache and warmed up);
  - engine-only: this process's own engine embedding the same texts in one call (the worker is
    idle meanwhile), the ceiling the pipeline is compared with;
  - end to end: the same texts as embed tasks, published at once, until every result object is in
    storage; efficiency = engine-only seconds / end-to-end seconds;
  - memory: the worker's peak resident set (VmHWM) after all of that.
The result cache is off in the worker (`--no-cache`), so every task is real inference."""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import embed_texts, peak_rss, table, timed
from worker.engine import Engine
from worker.settings import Settings

log = logging.getLogger(__name__)


def measure(engine: Engine, settings: Settings, *, n: int, texts_per_task: int = 16) -> dict[str, Any]:
    from google.cloud import pubsub_v1

    from worker import batches
    from worker.demo import start_worker, wait_worker_ready
    from worker.devservices import PubSubEmulator, StorageServer, ensure_bucket, ensure_subscription, ensure_topic
    from worker.store import GCSStore

    texts = embed_texts(n)
    tokens = sum(len(t.ids) for t in engine.tokenize(texts, truncate=True, what="text"))
    project, bucket = "bench-project", "bench-results"
    saved_env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp, \
            PubSubEmulator(project=project) as pubsub, StorageServer() as storage:
        os.environ.update({**pubsub.env, **storage.env})
        try:
            client = GCSStore.make_client(project=project)
            ensure_bucket(client, bucket)
            topic = ensure_topic(project, "bench-tasks")
            subscription = ensure_subscription(project, "bench-tasks", "bench-worker", ack_deadline_seconds=60)
            store = GCSStore(bucket, "results", client=client)
            batch_file = Path(tmp) / "batch.jsonl"
            lines = [{"custom_id": f"t{k:05d}", "method": "POST", "url": "/v1/embeddings",
                      "body": {"input": texts[k: k + texts_per_task]}} for k in range(0, n, texts_per_task)]
            batch_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
            worker_log = Path(tmp) / "worker.log"
            spawned = time.monotonic()
            worker = start_worker(settings, subscription=subscription, results=f"gs://{bucket}/results",
                                  log=worker_log, extra=["--no-cache"])
            try:
                wait_worker_ready(worker, worker_log, echo=lambda _: None)
                cold_start_s = time.monotonic() - spawned
                log.info("pipeline: worker ready in %.1f s; engine-only run", cold_start_s)
                engine.embed(texts[:8], truncate=True)
                engine_only = timed(lambda: engine.embed(texts, truncate=True))
                batch_id = batches.new_batch_id()
                batch = batches.read_batch_file(batch_file, batch_id=batch_id)
                batches.record_batch(store, batch, batch_id=batch_id, model=settings.model, source_name=batch_file.name)
                log.info("pipeline: publishing %d tasks", len(batch.lines))
                started = time.monotonic()
                batches.publish_batch(pubsub_v1.PublisherClient(), topic, batch.lines)
                status = batches.wait_for_batch(store, batch_id, poll_s=0.25, timeout_s=3600)
                end_to_end_s = time.monotonic() - started
                rss = peak_rss(worker.pid)
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=60)
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
    if status.ok != len(lines):
        raise RuntimeError(f"pipeline run incomplete: {status.ok} ok, {status.error} errors, {status.pending} pending")
    return {"texts": n, "tokens": tokens, "tasks": len(lines), "texts_per_task": texts_per_task,
            "cold_start_s": cold_start_s, "worker_peak_rss_bytes": rss,
            "engine_only_s": engine_only.seconds, "end_to_end_s": end_to_end_s,
            "efficiency": engine_only.seconds / end_to_end_s}


def render(r: dict[str, Any]) -> str:
    return (f"PIPELINE: {r['texts']} texts as {r['tasks']} embed tasks of {r['texts_per_task']}, "
            "Pub/Sub emulator -> worker process -> storage server\n"
            + table(["measure", "value"], [
                ["engine only (in process), s", r["engine_only_s"]],
                ["end to end (publish to last result), s", r["end_to_end_s"]],
                ["pipeline efficiency", f"{r['efficiency']:.0%}"],
                ["cold start (spawn to pulling, prepared cache), s", r["cold_start_s"]],
                ["worker peak RSS, GB", f"{r['worker_peak_rss_bytes'] / 1e9:.2f}"]]))
