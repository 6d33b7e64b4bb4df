"""Worker cold start: a fresh `cli.py worker` process, from spawn to its "pulling from" line (model
loaded from the prepared cache and warmed up), against one Pub/Sub emulator and storage server.

    python -m bench.coldstart --runs 3
    python -m bench.coldstart --tree . --tree /tmp/old --runs 2   # two checkouts, alternating

With several `--tree`s (checkouts sharing this interpreter's packages) the starts alternate
A, B, B, A, A, B, ... so a drift of the shared machine falls on both alike. Prints one line per
start and a JSON summary (each tree's seconds)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def order(trees: list[Path], runs: int) -> list[Path]:
    """A, B, B, A, A, B, ...: each tree `runs` times, every pair of rounds balanced."""
    sequence: list[Path] = []
    for k in range(runs):
        sequence += trees if k % 2 == 0 else trees[::-1]
    return sequence


def start_to_pulling(tree: Path, *, subscription: str, results: str, log: Path) -> float:
    from worker.demo import wait_worker_ready

    spawned = time.monotonic()
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, str(tree / "cli.py"), "worker", "--subscription", subscription,
                                   "--results", results, "--device", "cpu", "--log-level", "INFO", "--no-cache"],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=tree)
    try:
        wait_worker_ready(worker, log, echo=lambda _: None, poll_s=0.05)
        return time.monotonic() - spawned
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.coldstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, action="append", default=None,
                        help="a checkout to start the worker from (repeat to alternate; default: this one)")
    parser.add_argument("--runs", type=int, default=3, help="starts per tree (default 3)")
    args = parser.parse_args(argv)
    trees = [t.resolve() for t in (args.tree or [REPO])]
    for tree in trees:
        if not (tree / "cli.py").is_file():
            parser.error(f"{tree} has no cli.py")
    from worker.devservices import PubSubEmulator, StorageServer, ensure_bucket, ensure_subscription, ensure_topic
    from worker.store import GCSStore

    project, bucket = "coldstart-project", "coldstart-results"
    seconds: dict[str, list[float]] = {str(t): [] for t in trees}
    saved_env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp, \
            PubSubEmulator(project=project) as pubsub, StorageServer() as storage:
        os.environ.update({**pubsub.env, **storage.env})
        try:
            ensure_bucket(GCSStore.make_client(project=project), bucket)
            ensure_topic(project, "coldstart-tasks")
            subscription = ensure_subscription(project, "coldstart-tasks", "coldstart-worker", ack_deadline_seconds=60)
            for k, tree in enumerate(order(trees, args.runs)):
                s = start_to_pulling(tree, subscription=subscription, results=f"gs://{bucket}/results",
                                     log=Path(tmp) / f"worker-{k}.log")
                seconds[str(tree)].append(round(s, 2))
                print(f"{tree}: {s:.2f} s spawn to pulling", flush=True)
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
    print(json.dumps({"spawn_to_pulling_s": seconds}))
    return seconds


if __name__ == "__main__":
    main()
