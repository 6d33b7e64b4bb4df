"""Faults against the real stack (Google's Pub/Sub emulator, fake-gcs-server, the real model,
`cli.py worker` processes): every accepted task ends with exactly one result object."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from schemas.result import Result
from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.pipeline import (WorkerProcess, count_results, new_topic, publish_raw, wait_for,
                                     wait_for_count)
from tests.fixtures.services import TEST_PROJECT
from tests.reliability.figures import record
from worker.devservices import PubSubEmulator, ensure_subscription, ensure_topic, free_port
from worker.store import GCSStore

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.reliability]

# `make test` runs every test lighter so the whole suite stays well under 30 minutes;
# `make test-reliability` runs the full sizes (500 tasks and three kills; 300 tasks; 150 tasks
# published twice; 200 tasks through storage faults and through a broker restart; 5,000 queued tasks).
FULL = os.environ.get("GEMMA_BATCH_RELIABILITY") == "full"
CRASH_TASKS = 500 if FULL else 60
STOP_TASKS = 300 if FULL else 60
PAIR_TASKS = 150 if FULL else 60
FAULT_TASKS = 200 if FULL else 90
RESTART_TASKS = 200 if FULL else 80
FLOOD_TASKS = 5000 if FULL else 600
SETTLE_S = 2.0  # the crash test: how long a successor has been pulling when the kill lands


def _tasks(prefix: str, n: int, docstrings: list[str], *, chars: int = 300) -> list[tuple[bytes, dict[str, str]]]:
    return [(json.dumps({"task_id": f"{prefix}-{i}", "kind": "embed",
                         "payload": {"texts": [docstrings[i % len(docstrings)][:chars]], "dims": 16}}).encode(), {})
            for i in range(n)]


def _long_tasks(prefix: str, n: int, docstrings: list[str]) -> list[tuple[bytes, dict[str, str]]]:
    """n embed tasks of one docstring of 1,200 characters and more each, cut to 1,500 (300-400
    tokens), made unique by their number so the result cache answers none of them: enough work that
    a fast 2-core machine is still busy when the faults land (with shorter texts a 2-core Xeon
    finished every task inside the graceful stop's drain, and before the crash test's kills)."""
    long = [d for d in docstrings if len(d) >= 1200]
    return _tasks(prefix, n, [f"Task {i}. {long[i % len(long)]}" for i in range(n)], chars=1500)


def _assert_exactly_one_valid_result_each(store: GCSStore, prefix: str, n: int) -> None:
    names = sorted(store.list("adhoc/"))
    expected = sorted(f"adhoc/{prefix}-{i}.json" for i in range(n))
    assert names == expected, f"{len(set(expected) - set(names))} missing, {len(set(names) - set(expected))} extra"
    for name in names:
        result = Result.model_validate_json(store.get(name))
        assert result.status == "ok", result.error


@pytest.fixture
def store(gcs_bucket: str, gcs_client) -> GCSStore:
    return GCSStore(gcs_bucket, "results", client=gcs_client)


def _results(store: GCSStore) -> str:
    return store.uri("x").removesuffix("/x")


def test_crash_sigkill_three_times_loses_nothing(pubsub_emulator, store: GCSStore, tmp_path: Path,
                                                 docstrings: list[str]) -> None:
    # Given 500 tasks (60 in the light run) and a worker SIGKILLed at three random moments mid-batch
    topic, subscription = new_topic(TEST_PROJECT)
    # Texts of a few hundred tokens (`_long_tasks`) keep each engine call to a few dozen tasks, so the
    # kills land mid-run (texts of 800 characters once left a fast 2-core Xeon's first worker 38 of 60
    # tasks done at the first kill, and the last kill found all 60 done). One kill point is drawn from
    # each sixth of the run after its first tenth, so the last falls by 60% of it: the worker killed
    # last has done part of its share while the final worker started, and a last point drawn near
    # the end could find every task done (a draw of 35, 39 and 43 out of 60 did once).
    publish_raw(topic, _long_tasks("crash", CRASH_TASKS, docstrings))
    rng, kills = random.Random(500), []
    sixth = CRASH_TASKS // 6
    points = [rng.randrange(CRASH_TASKS // 10 + k * sixth, CRASH_TASKS // 10 + (k + 1) * sixth) for k in range(3)]
    # Each worker's successor is started as soon as it takes over and is pulling (idle: the running
    # worker holds every task's lease) when the kill lands, as a replacement instance would be. The
    # emulator hands a dead worker's tasks at once to a stream open when their leases run out; to
    # one opened later, only after a further 15-20 s (a development timing), which would make this
    # test wait, not work. Nor is a stream served at once when it opened just as the kill landed
    # (a development script, 8 trials: a stream opened at the kill got 4 of 10 tasks in 300 s, the
    # first after 50 s; one opened 0.5-5 s before got them 4-9 s after it), so each kill waits until
    # its successor has been pulling for SETTLE_S.
    def start(name: str) -> WorkerProcess:
        return WorkerProcess(subscription=subscription, results=_results(store), log_path=tmp_path / f"{name}.log")

    worker = start("w0")
    successor = None
    try:
        worker.wait_ready()
        for k, point in enumerate(points):
            successor = start(f"w{k + 1}" if k < 2 else "final")
            successor.wait_ready()
            pulling = time.monotonic()
            # the kill lands at its point, and not before the worker has written a result since it
            # took over: it then holds a batch (a worker left waiting for the emulator to hand back
            # its predecessor's tasks was once killed holding none, at 37, 37)
            wait_for_count(store, max(point, kills[-1] + 1 if kills else 1), timeout=300)
            time.sleep(max(0.0, pulling + SETTLE_S - time.monotonic()))
            worker.stop(signal.SIGKILL)
            kills.append(count_results(store))
            worker, successor = successor, None
        # When the fourth worker is left to finish
        names = [f"adhoc/crash-{i}.json" for i in range(CRASH_TASKS)]
        missing = wait_for(store, names, timeout=300, worker=worker)
    finally:
        for w in (worker, successor):
            if w is not None:
                w.stop()
    # Then every task has one result, one object per task, all valid
    assert not missing, f"{len(missing)} missing"
    _assert_exactly_one_valid_result_each(store, "crash", CRASH_TASKS)
    assert kills[-1] < CRASH_TASKS, "the kills came too late to test anything"
    assert all(b > a for a, b in zip([0, *kills], kills)), f"a worker was killed before it did any work: {kills}"
    record("crash", tasks=CRASH_TASKS, sigkills=3, results_at_each_kill=kills, results=CRASH_TASKS, lost=0,
           duplicates=0)


def test_sigterm_exits_within_10s_and_the_rest_is_redelivered(pubsub_emulator, store: GCSStore, tmp_path: Path,
                                                              docstrings: list[str]) -> None:
    # Given a worker busy with a large batch of long texts (`_long_tasks`: the first 60 docstrings,
    # mostly short, were all done inside the drain on a 2-core Xeon, leaving nothing to redeliver)
    topic, subscription = new_topic(TEST_PROJECT)
    publish_raw(topic, _long_tasks("term", STOP_TASKS, docstrings))
    first = WorkerProcess(subscription=subscription, results=_results(store), log_path=tmp_path / "first.log")
    first.wait_ready()
    wait_for_count(store, 5, timeout=120)
    # When it gets SIGTERM (Cloud Run's notice)
    exit_s = first.stop(signal.SIGTERM)
    written = count_results(store)
    # Then it exits within 10 s, having finished part of the work
    assert first.proc.returncode == 0 and exit_s < 10, (first.proc.returncode, exit_s)
    assert written < STOP_TASKS
    # And the next worker completes the rest: nothing was acked without its result
    second = WorkerProcess(subscription=subscription, results=_results(store), log_path=tmp_path / "second.log")
    try:
        second.wait_ready()
        missing = wait_for(store, [f"adhoc/term-{i}.json" for i in range(STOP_TASKS)], timeout=300, worker=second)
    finally:
        second.stop()
    assert not missing, f"{len(missing)} missing"
    _assert_exactly_one_valid_result_each(store, "term", STOP_TASKS)
    record("graceful_stop", tasks=STOP_TASKS, exit_seconds=round(exit_s, 2), results_before_stop=written,
           results=STOP_TASKS, lost=0)


def test_two_workers_and_duplicate_publishes_give_one_result_per_task(pubsub_emulator, store: GCSStore,
                                                                      tmp_path: Path, docstrings: list[str]) -> None:
    # Given two workers on one subscription and 150 tasks (60 in the light run) each published twice
    topic, subscription = new_topic(TEST_PROJECT)
    workers = [WorkerProcess(subscription=subscription, results=_results(store), log_path=tmp_path / f"w{i}.log")
               for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        tasks = _tasks("pair", PAIR_TASKS, docstrings)
        publish_raw(topic, tasks + tasks[::-1])
        missing = wait_for(store, [f"adhoc/pair-{i}.json" for i in range(PAIR_TASKS)], timeout=300)
        time.sleep(3)  # let the second copies settle too
    finally:
        for w in workers:
            w.stop()
    # Then one result per task id, each written exactly once across both workers, and no errors from the race
    assert not missing
    _assert_exactly_one_valid_result_each(store, "pair", PAIR_TASKS)
    outcomes = [w.outcomes() for w in workers]
    assert sum(o.get("done", 0) for o in outcomes) == PAIR_TASKS, outcomes
    errors = [r for w in workers for r in w.records() if r.get("severity") in ("ERROR", "CRITICAL")]
    assert errors == []
    record("two_workers", tasks=PAIR_TASKS, deliveries_published=2 * PAIR_TASKS, results=PAIR_TASKS,
           written_by_worker=[o.get("done", 0) for o in outcomes],
           duplicates_recognised=sum(o.get("duplicate", 0) for o in outcomes), lost=0)


def test_storage_faults_are_retried_and_nothing_is_lost(pubsub_emulator, storage_server, store: GCSStore,
                                                        tmp_path: Path, docstrings: list[str]) -> None:
    # Given a proxy in front of the storage server that spoils 25% of requests (503, reset, delay, lost reply)
    topic, subscription = new_topic(TEST_PROJECT)
    with FaultProxy(storage_server.port, rate=0.25, seed=7) as proxy:
        worker = WorkerProcess(subscription=subscription, results=_results(store), log_path=tmp_path / "w.log",
                               env={"STORAGE_EMULATOR_HOST": proxy.url})
        try:
            worker.wait_ready()
            # When 200 tasks (90 in the light run) run through the worker, which reads and writes
            # through the proxy
            publish_raw(topic, _tasks("fault", FAULT_TASKS, docstrings))
            missing = wait_for(store, [f"adhoc/fault-{i}.json" for i in range(FAULT_TASKS)], timeout=300)
        finally:
            worker.stop()
    # Then every task completes with one result, although every kind of fault was injected
    assert not missing, f"{len(missing)} missing"
    _assert_exactly_one_valid_result_each(store, "fault", FAULT_TASKS)
    injected = {k: proxy.counts[k] for k in ("503", "reset", "delay", "lost")}
    assert all(v > 0 for v in injected.values()), injected
    assert proxy.counts["lost:upload"] > 0, "no landed-but-unacknowledged write was exercised"
    record("storage_faults", tasks=FAULT_TASKS, storage_requests=proxy.counts["requests"], faults=injected,
           lost_replies_on_writes=proxy.counts["lost:upload"], results=FAULT_TASKS, lost=0)


def test_broker_restart_mid_run_the_worker_reconnects_and_finishes(tmp_path: Path, store: GCSStore,
                                                                   docstrings: list[str]) -> None:
    # Given a worker pulling from an emulator of its own, with 200 tasks (80 in the light run) published
    port = free_port()
    project = "restart-project"
    emulator = PubSubEmulator(project=project, port=port).start()
    env = emulator.env
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            topic = ensure_topic(project, "tasks")
            subscription = ensure_subscription(project, "tasks", "worker", ack_deadline_seconds=10)
            tasks = _tasks("restart", RESTART_TASKS, docstrings)
            publish_raw(topic, tasks)
            worker = WorkerProcess(subscription=subscription, results=_results(store), log_path=tmp_path / "w.log",
                                   env=env)
            try:
                worker.wait_ready()
                before = wait_for_count(store, 30, timeout=120)
                # When the emulator is stopped and started again on the same port (it keeps nothing),
                # and the publisher, seeing no acknowledgement, publishes the tasks again
                emulator.stop()
                time.sleep(2)
                emulator = PubSubEmulator(project=project, port=port).start()
                ensure_topic(project, "tasks")
                ensure_subscription(project, "tasks", "worker", ack_deadline_seconds=10)
                publish_raw(topic, tasks)
                missing = wait_for(store, [f"adhoc/restart-{i}.json" for i in range(RESTART_TASKS)], timeout=300,
                                   worker=worker)
            finally:
                worker.stop()
    finally:
        emulator.stop()
    # Then the same worker process reconnected and finished: one result per task
    assert not missing, f"{len(missing)} missing"
    _assert_exactly_one_valid_result_each(store, "restart", RESTART_TASKS)
    assert worker.proc.returncode == 0
    record("broker_restart", tasks=RESTART_TASKS, results_before_restart=before, results=RESTART_TASKS, lost=0)


def test_flood_of_5000_tasks_keeps_memory_bounded(pubsub_emulator, store: GCSStore, tmp_path: Path) -> None:
    # Given 5,000 tasks (600 in the light run) queued before the worker starts, and flow control of
    # 100 messages in flight
    topic, subscription = new_topic(TEST_PROJECT, ack_deadline_seconds=60)
    publish_raw(topic, [(json.dumps({"task_id": f"flood-{i}", "kind": "embed",
                                     "payload": {"texts": [f"flood task number {i}"], "dims": 8}}).encode(), {})
                        for i in range(FLOOD_TASKS)])
    worker = WorkerProcess(subscription=subscription, results=_results(store), log_path=tmp_path / "w.log",
                           extra=["--max-messages", "100"])
    try:
        worker.wait_ready()
        done = wait_for_count(store, FLOOD_TASKS, timeout=600)
        peak_mb = worker.peak_rss_mb()
    finally:
        worker.stop()
    # Then all complete and the worker's peak memory stays bounded (well under 2.5 GB)
    assert done == FLOOD_TASKS
    assert peak_mb < 2560, peak_mb
    record("flood", tasks=FLOOD_TASKS, flow_control_max_messages=100, results=done, peak_rss_mb=round(peak_mb), lost=0)
