"""`make demo`: the main job on the embedded default, with real inputs, reporting what it did."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from worker.corpus import stdlib_docstrings
from worker.engine import build_engine
from worker.settings import Settings

DEMO_PROMPTS = [
    "The Python standard library module `json` is used to",
    "A knowledge graph is",
    "def is_prime(n: int) -> bool:",
    "Cloud Run scales to zero, which means",
]


def run_engine_demo(settings: Settings, *, n_texts: int, echo: Callable[[str], None]) -> None:
    """Embed a real corpus and complete a few prompts, then print counts, speed and a sanity check."""
    started = time.monotonic()
    engine = build_engine(settings)
    echo(f"model {engine.name} on {engine.model.placement.device} ({engine.model.placement.dtype}), "
         f"loaded in {time.monotonic() - started:.1f}s")

    texts = stdlib_docstrings(n_texts, max_chars=2000)
    t0 = time.monotonic()
    out = engine.embed(texts)
    seconds = time.monotonic() - t0
    tokens = sum(out.input_tokens)
    echo(f"embedded {len(texts)} standard-library docstrings ({tokens} tokens) in {seconds:.1f}s: "
         f"{len(texts) / seconds:.1f} texts/s, {tokens / seconds:.0f} tokens/s, {out.vectors.shape[1]} dims")
    sims = out.vectors @ out.vectors[0]
    nearest = int(np.argsort(-sims)[1])
    echo(f"  nearest neighbour of text 0 {_preview(texts[0])!r}: text {nearest} {_preview(texts[nearest])!r} "
         f"(cosine {sims[nearest]:.3f})")

    t0 = time.monotonic()
    gens = engine.generate(DEMO_PROMPTS, max_new_tokens=32)
    seconds = time.monotonic() - t0
    new_tokens = sum(len(g.token_ids) for g in gens)
    echo(f"generated {new_tokens} tokens for {len(gens)} prompts in one batch in {seconds:.1f}s "
         f"({new_tokens / seconds:.1f} tokens/s, greedy)")
    for prompt, g in zip(DEMO_PROMPTS, gens):
        echo(f"  {prompt!r} -> {_preview(g.text, 90)!r}")
    echo(f"done in {time.monotonic() - started:.1f}s")


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def write_demo_batch(path: Path, *, n_embed: int, n_generate: int) -> int:
    """A batch file of real work: OpenAI embedding lines over standard-library docstrings, plus a few
    completion and chat lines. Returns the number of lines."""
    docs = stdlib_docstrings(n_embed, max_chars=1500)
    lines = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": doc}}
             for i, doc in enumerate(docs)]
    for i in range(n_generate):
        prompt = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"Complete this in one sentence: {prompt}"}],
                    "max_tokens": 24}
            lines.append({"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        else:
            lines.append({"custom_id": f"gen-{i}", "method": "POST", "url": "/v1/completions",
                          "body": {"prompt": prompt, "max_tokens": 24}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def run_pipeline_demo(settings: Settings, *, n_embed: int, n_generate: int, out_dir: Path,
                      echo: Callable[[str], None]) -> None:
    """The whole main job on loopback: emulator, storage server, a worker process, a submitted batch."""
    from google.cloud import pubsub_v1

    from worker import batches
    from worker.devservices import PubSubEmulator, StorageServer, ensure_bucket, ensure_subscription, ensure_topic
    from worker.store import GCSStore

    out_dir.mkdir(parents=True, exist_ok=True)
    project, bucket = "demo-project", "demo-results"
    with PubSubEmulator(project=project) as pubsub, StorageServer() as storage:
        os.environ.update({**pubsub.env, **storage.env})
        echo(f"Pub/Sub emulator on {pubsub.env['PUBSUB_EMULATOR_HOST']}, storage server on "
             f"{storage.env['STORAGE_EMULATOR_HOST']}")
        client = GCSStore.make_client(project=project)
        ensure_bucket(client, bucket)
        topic = ensure_topic(project, "gemma-tasks")
        subscription = ensure_subscription(project, "gemma-tasks", "gemma-worker", ack_deadline_seconds=60)
        results = f"gs://{bucket}/results"
        store = GCSStore(bucket, "results", client=client)
        batch_file = out_dir / "demo-batch.jsonl"
        count = write_demo_batch(batch_file, n_embed=n_embed, n_generate=n_generate)
        echo(f"wrote {count} tasks to {batch_file}")
        worker = start_worker(settings, subscription=subscription, results=results, log=out_dir / "worker.log")
        try:
            wait_worker_ready(worker, out_dir / "worker.log", echo=echo)
            batch_id = batches.new_batch_id()
            batch = batches.read_batch_file(batch_file, batch_id=batch_id)
            batches.record_batch(store, batch, batch_id=batch_id, model=settings.model, source_name=batch_file.name)
            started = time.monotonic()
            batches.publish_batch(pubsub_v1.PublisherClient(), topic, batch.lines)
            echo(f"published batch {batch_id} to {topic}")
            status = _follow(store, batch_id, echo=echo)
            seconds = time.monotonic() - started
            summary = batches.collect_results(store, batch_id, out=out_dir / "demo-results.jsonl")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
        echo(f"done: {status.ok} ok, {status.error} errors, {status.pending} pending of {status.total} tasks "
             f"in {seconds:.1f}s ({status.total / seconds:.1f} tasks/s end to end)")
        echo(f"results: {store.uri(batch_id + '/')} (one object per task), collected in input order to "
             f"{summary.out}; worker log: {out_dir / 'worker.log'}")
        _print_batches(out_dir / "worker.log", echo=echo)
    echo("stopped the worker, the emulator and the storage server")


def start_worker(settings: Settings, *, subscription: str, results: str, log: Path,
                 extra: Sequence[str] = ()) -> subprocess.Popen:
    """`cli.py worker` as a child process, its output in `log`; `extra` adds flags."""
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    args = [sys.executable, str(cli), "worker", "--subscription", subscription, "--results", results,
            "--model", settings.model, "--cache-dir", str(settings.cache_dir), "--device", settings.device,
            "--log-level", "INFO", *extra]
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=dict(os.environ))


def wait_worker_ready(worker: subprocess.Popen, log: Path, *, echo: Callable[[str], None],
                      poll_s: float = 0.3) -> None:
    """Returns once the worker logs that it pulls (model loaded and warmed up), looking every `poll_s`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}; see {log}")
        if "pulling from" in log.read_text(errors="replace"):
            echo("worker ready (model loaded and warmed up)")
            return
        time.sleep(poll_s)
    raise RuntimeError(f"the worker was not ready after 300s; see {log}")


def _follow(store, batch_id: str, *, echo: Callable[[str], None]):
    from worker import batches

    last = [0.0]

    def progress(status) -> None:
        if time.monotonic() - last[0] >= 5 or status.pending == 0:
            last[0] = time.monotonic()
            echo(f"  {status.ok + status.error}/{status.total} done ({status.error} errors)")

    return batches.wait_for_batch(store, batch_id, poll_s=1.0, timeout_s=1800, on_progress=progress)


def _print_batches(log: Path, *, echo: Callable[[str], None]) -> None:
    sizes = []
    for line in log.read_text(errors="replace").splitlines():
        if '"batch done"' in line:
            sizes.append(json.loads(line)["requests"])
    if sizes:
        echo(f"engine calls: {len(sizes)}, tasks per call: mean {sum(sizes) / len(sizes):.1f}, max {max(sizes)}")
