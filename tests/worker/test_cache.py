"""The result cache over the runner, with the real Gemma 3 270M and a real results directory: an
identical greedy or seeded task is answered from `_cache/` without the engine, opt-outs per task and
per worker, store faults on the cache path, the batch status count and the /metrics counters."""
from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.envelope import ENVELOPE_ADAPTER
from schemas.errors import ErrorCode, TaskError
from schemas.export import SCHEMA_DIR
from schemas.result import Result
from tests.conftest import run_cli
from tests.fixtures.pipeline import WorkerProcess, new_topic, publish_raw, wait_for
from tests.fixtures.services import TEST_PROJECT
from worker.app import Stats, build_runtime
from worker.batcher import TokenBudgetBatcher
from worker.batches import batch_status, read_batch_file, record_batch, without_cache
from worker.cache import CACHE_PREFIX, cache_key, cache_name, engine_facts
from worker.engine import Engine
from worker.runner import Delivery, Outcome, Runner, result_name
from worker.service import create_app
from worker.service_run import BackgroundServer
from worker.settings import Settings
from worker.store import GCSStore, LocalStore, Store
from worker.tasks import TaskContext

ENGINE_METHODS = ("tokenize", "embed_pass", "generate_tokenized")


def counting_engine(engine: Engine, *, max_new_tokens: int | None = None) -> tuple[Engine, Counter]:
    """The session's model behind an engine of its own whose work methods count their calls and call through."""
    clone = Engine(engine.model, max_input_tokens=engine.max_input_tokens, token_budget=engine.token_budget,
                   max_batch_size=engine.max_batch_size, max_new_tokens=max_new_tokens or engine.max_new_tokens)
    calls: Counter = Counter()
    for name in ENGINE_METHODS:
        real = getattr(clone, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        setattr(clone, name, counted)
    return clone, calls


class CacheFaultStore(LocalStore):
    """A results directory whose cache objects cannot be read or written (a storage outage on that path
    only), so the task's own result still lands: the fault the cache must survive."""

    def get(self, name: str) -> bytes | None:
        if name.startswith(f"{CACHE_PREFIX}/"):
            raise TaskError(ErrorCode.STORAGE_UNAVAILABLE, f"read {name} failed: injected outage", retryable=True)
        return super().get(name)

    def put_if_absent(self, name: str, data: bytes, *, content_type: str = "application/json") -> bool:
        if name.startswith(f"{CACHE_PREFIX}/"):
            raise TaskError(ErrorCode.STORAGE_UNAVAILABLE, f"write {name} failed: injected outage", retryable=True)
        return super().put_if_absent(name, data, content_type=content_type)


@dataclass
class Rig:
    runner: Runner
    store: Store
    calls: Counter
    stats: Stats

    def run(self, envelope: dict[str, Any]) -> tuple[Outcome, Result]:
        body = json.dumps(envelope).encode()
        outcome = self.runner.submit(Delivery(data=body, attributes={})).result(timeout=300)
        raw = json.loads(self.store.get(result_name(envelope.get("batch_id"), envelope["task_id"])))
        jsonschema.validate(raw, json.loads((SCHEMA_DIR / "result.schema.json").read_text()))
        return outcome, Result.model_validate(raw)

    def engine_calls(self) -> int:
        return self.calls["embed_pass"] + self.calls["generate_tokenized"]

    def entries(self) -> list[str]:
        return list(self.store.list(f"{CACHE_PREFIX}/"))


@pytest.fixture
def make_rig(engine: Engine, tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[TokenBudgetBatcher, Runner]] = []

    def make(*, result_cache: bool = True, store: Store | None = None, max_new_tokens: int | None = None,
             max_texts_per_task: int = 256) -> Rig:
        counted, calls = counting_engine(engine, max_new_tokens=max_new_tokens)
        stats = Stats()
        batcher = TokenBudgetBatcher(counted, max_wait_s=0.01, on_batch=stats.on_batch).start()
        settings = Settings(device="cpu", result_cache=result_cache, max_texts_per_task=max_texts_per_task)
        store = store or LocalStore(tmp_path / "results")
        runner = Runner(ctx=TaskContext(settings=settings, engine=counted, batcher=batcher), store=store,
                        on_outcome=stats.on_outcome, on_cache=stats.on_cache)
        made.append((batcher, runner))
        return Rig(runner=runner, store=store, calls=calls, stats=stats)

    yield make
    for batcher, runner in made:
        batcher.stop()
        runner.close()


def _embed(task_id: str, texts: list[str], **payload: Any) -> dict[str, Any]:
    return {"task_id": task_id, "kind": "embed", "payload": {"texts": texts, **payload}}


def _generate(task_id: str, prompt: str, **payload: Any) -> dict[str, Any]:
    return {"task_id": task_id, "kind": "generate", "payload": {"prompt": prompt, "max_tokens": 4, **payload}}


def _task(envelope: dict[str, Any]) -> Any:
    return ENVELOPE_ADAPTER.validate_python(envelope)


def test_an_identical_embed_task_is_answered_from_the_cache_without_the_engine(make_rig: Any,
                                                                                engine: Engine) -> None:
    rig = make_rig()
    # Given an embed task that ran and was written
    first_outcome, first = rig.run(_embed("e-1", ["the cache keeps this", "and this"], dims=32))
    calls_after_first = dict(rig.calls)
    # When the same payload comes again as another task, in a batch, with the caller's own key
    again = {**_embed("e-2", ["the cache keeps this", "and this"], dims=32), "batch_id": "b-1", "custom_id": "mine"}
    second_outcome, second = rig.run(again)
    # Then the first ran the model and the second did not touch the engine at all
    assert first_outcome == second_outcome == Outcome.DONE
    assert not first.cached and calls_after_first["embed_pass"] >= 1
    assert dict(rig.calls) == calls_after_first
    # And the second result is its own (ids, kind) with the same vectors, and says it was cached
    assert second.cached and second.status.value == "ok"
    assert (second.task_id, second.batch_id, second.custom_id, second.kind) == ("e-2", "b-1", "mine", "embed")
    assert second.output == first.output and len(second.output.embeddings[0]) == 32
    assert second.model == first.model == engine.name and second.timings.inference_ms is None
    # And exactly one entry sits under _cache/, named by the task's key, and both lookups were counted
    key = cache_key(engine.name, _task(again), facts=engine_facts(engine))
    assert rig.entries() == [cache_name(key)]
    assert rig.stats.cache == Counter({"miss": 1, "hit": 1})


def test_greedy_and_seeded_generation_is_cached_but_unseeded_sampling_always_runs(make_rig: Any) -> None:
    rig = make_rig()
    # Given greedy, seeded-sampling and unseeded-sampling tasks, each sent twice under two task ids
    pairs = {"greedy": {}, "seeded": {"temperature": 0.9, "seed": 7}, "unseeded": {"temperature": 0.9}}
    results: dict[str, list[Result]] = {}
    ran: dict[str, int] = {}
    for name, params in pairs.items():
        before = rig.engine_calls()
        results[name] = [rig.run(_generate(f"{name}-{i}", "The capital of France is", **params))[1] for i in (1, 2)]
        ran[name] = rig.engine_calls() - before
    # Then greedy and seeded ran once and the repeat got the same text from the cache
    for name in ("greedy", "seeded"):
        first, second = results[name]
        assert ran[name] == 1 and (first.cached, second.cached) == (False, True)
        assert second.output.text == first.output.text and second.output.completion_tokens >= 1
    # And unseeded sampling ran both times, was never looked up and left no entry
    assert ran["unseeded"] == 2 and not any(r.cached for r in results["unseeded"])
    assert len(rig.entries()) == 2
    assert rig.stats.cache == Counter({"miss": 2, "hit": 2})


def test_the_key_ignores_ids_and_spelled_out_defaults_and_follows_every_parameter(engine: Engine) -> None:
    facts = engine_facts(engine)

    def key(envelope: dict[str, Any], *, model: str = engine.name, **more: Any) -> str | None:
        return cache_key(model, _task(envelope), facts={**facts, **more})

    # Given one embed request under different ids, times and with its defaults written out
    base = key(_embed("a", ["x", "y"]))
    same = [key({**_embed("b", ["x", "y"]), "batch_id": "b-9", "custom_id": "c", "created_at": "2020-01-01T00:00:00Z"}),
            key(_embed("c", ["x", "y"], dims=None, normalize=True, truncate=False))]
    # Then the key is the same: a sha256 hex digest
    assert all(k == base for k in same) and len(base) == 64 and int(base, 16) >= 0
    # And every parameter, the input, the model and the engine's facts change it
    embed_variants = [_embed("a", ["y", "x"]), _embed("a", ["x"]), _embed("a", ["x", "y"], dims=64),
                      _embed("a", ["x", "y"], normalize=False), _embed("a", ["x", "y"], truncate=True)]
    keys = {base, *(key(e) for e in embed_variants), key(_embed("a", ["x", "y"]), model="other-model"),
            key(_embed("a", ["x", "y"]), dtype="torch.bfloat16"), key(_embed("a", ["x", "y"]), max_input_tokens=8)}
    assert None not in keys and len(keys) == 5 + 4
    gen = _generate("g", "Once upon a time")
    gen_variants = [gen, _generate("g", "Once upon a time", max_tokens=5),
                    _generate("g", "Once upon a time", stop=["."]),
                    _generate("g", "Once upon a time", temperature=0.5, seed=1),
                    _generate("g", "Once upon a time", temperature=0.5, seed=2),
                    _generate("g", "Once upon a time", temperature=0.7, seed=1),
                    _generate("g", "Once upon a time", temperature=0.5, seed=1, top_p=0.9),
                    _generate("g", "Once upon a time", response_schema={"type": "object"}),
                    _generate("g", "Once upon a time.")]
    gen_keys = [key(g) for g in gen_variants]
    assert None not in gen_keys and len(set(gen_keys)) == len(gen_variants)
    # And greedy decoding ignores seed and top_p, so they do not split its entry
    assert key(_generate("g", "Once upon a time", seed=3, top_p=0.5)) == key(gen)
    # And sampling without a seed has no key; graph and code (always greedy) do
    assert key(_generate("g", "Once upon a time", temperature=0.5)) is None
    assert key({"task_id": "d", "kind": "graph", "payload": {"text": "Paris is in France."}}) is not None
    assert key({"task_id": "d", "kind": "code", "payload": {"source": "x = 1"}}) is not None


def test_a_task_that_opts_out_runs_and_stores_nothing(make_rig: Any) -> None:
    rig = make_rig()
    # Given a cached answer for a text
    _, cached_first = rig.run(_embed("o-1", ["opting out"]))
    calls, lookups = rig.engine_calls(), sum(rig.stats.cache.values())
    # When the identical task comes with cache=false, and a new text with cache=false
    _, opted = rig.run({**_embed("o-2", ["opting out"]), "cache": False})
    _, fresh = rig.run({**_embed("o-3", ["never cached"]), "cache": False})
    # Then both ran the model with the same answer, neither was looked up, and no entry was added
    assert not opted.cached and not fresh.cached and opted.output == cached_first.output
    assert rig.engine_calls() == calls + 2 and sum(rig.stats.cache.values()) == lookups
    assert len(rig.entries()) == 1
    # And the text sent with cache=false is a miss when asked normally later
    _, later = rig.run(_embed("o-4", ["never cached"]))
    assert not later.cached and rig.stats.cache["miss"] == 2


def test_a_worker_with_the_cache_off_neither_reads_nor_writes_it(make_rig: Any) -> None:
    # Given a results directory that already holds a cached answer
    on = make_rig()
    on.run(_embed("w-1", ["worker level"]))
    assert len(on.entries()) == 1
    # When a worker with result_cache off runs the identical task and a new one on the same directory
    off = make_rig(result_cache=False, store=on.store)
    _, same = off.run(_embed("w-2", ["worker level"]))
    _, new = off.run(_embed("w-3", ["new to the cache"]))
    # Then both ran the model, nothing was looked up, and no entry was added
    assert not same.cached and not new.cached and off.engine_calls() == 2
    assert sum(off.stats.cache.values()) == 0 and len(off.entries()) == 1


def test_a_worker_answers_from_the_cache_only_what_its_own_limits_allow(make_rig: Any) -> None:
    # Given a worker with generous limits that answered 3-text and 2-text embed tasks and an 8-token generation
    roomy = make_rig()
    three = ["limits first", "then the cache", "then the model"]
    _, embedded = roomy.run(_embed("l-1", three))
    _, two = roomy.run(_embed("l-2", three[:2]))
    _, generated = roomy.run(_generate("l-3", "The capital of France is", max_tokens=8))
    assert not embedded.cached and not two.cached and not generated.cached and len(roomy.entries()) == 3
    # When a worker on the same results location, allowing 2 texts per task and 4 new tokens, gets both again
    strict = make_rig(store=roomy.store, max_new_tokens=4, max_texts_per_task=2)
    _, too_many = strict.run(_embed("l-4", three))
    _, too_long = strict.run(_generate("l-5", "The capital of France is", max_tokens=8))
    # Then it refuses both as it would without the cache, never looking them up or running the model
    assert too_many.status.value == too_long.status.value == "error" and not too_many.cached and not too_long.cached
    assert too_many.error.code == ErrorCode.TOO_MANY_INPUTS and "max_texts_per_task=2" in too_many.error.message
    assert too_long.error.code == ErrorCode.MAX_TOKENS_OUT_OF_RANGE and "max_new_tokens=4" in too_long.error.message
    assert sum(strict.stats.cache.values()) == 0 and strict.engine_calls() == 0
    # And a task within its limits is still answered from the cache, without the model
    _, within = strict.run(_embed("l-6", three[:2]))
    assert within.cached and within.output == two.output
    assert strict.stats.cache == Counter({"hit": 1}) and strict.engine_calls() == 0


def test_store_faults_on_the_cache_path_never_fail_the_task(make_rig: Any, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="worker.cache")
    rig = make_rig(store=CacheFaultStore(tmp_path / "faulty"))
    # Given a store whose cache reads and writes fail while results still land
    # When the same task runs twice
    outcomes, results = zip(*(rig.run(_embed(f"f-{i}", ["storage is flaky"])) for i in (1, 2)))
    # Then both succeeded by running the model: each failed read was a miss, each failed write a log line
    assert outcomes == (Outcome.DONE, Outcome.DONE) and all(r.status.value == "ok" and not r.cached for r in results)
    assert rig.engine_calls() == 2 and rig.stats.cache == Counter({"miss": 2})
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cache read failed" in m for m in messages) == 2
    assert sum("cache write failed" in m for m in messages) == 2
    assert not (tmp_path / "faulty" / CACHE_PREFIX).exists()


def test_a_corrupt_entry_is_a_miss_and_error_results_are_never_cached(make_rig: Any, engine: Engine) -> None:
    rig = make_rig()
    # Given an entry spoiled by hand, and tasks that can only fail
    spoiled = _embed("c-1", ["spoiled entry"])
    rig.store.put_if_absent(cache_name(cache_key(engine.name, _task(spoiled), facts=engine_facts(engine))), b"{oops")
    _, repaired = rig.run(spoiled)
    _, bad_dims = rig.run(_embed("c-2", ["too wide"], dims=100_000))
    _, bad_again = rig.run(_embed("c-3", ["too wide"], dims=100_000))
    # Then the spoiled entry was a miss and the task ran; the failures stayed failures with no entry
    assert repaired.status.value == "ok" and not repaired.cached
    assert bad_dims.status.value == bad_again.status.value == "error" and not bad_again.cached
    assert bad_again.error.code == ErrorCode.INVALID_PARAMETER
    assert len(rig.entries()) == 1  # the spoiled one, left as it was (create-only)


def test_status_counts_the_results_that_came_from_the_cache(make_rig: Any, tmp_path: Path) -> None:
    rig = make_rig()
    # Given a recorded batch of four lines, two of them repeating an earlier line's payload
    lines = [{"kind": "embed", "custom_id": f"s-{i}", "payload": {"texts": [text]}}
             for i, text in enumerate(["status one", "status two", "status one", "status two"])]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch = read_batch_file(path, batch_id="cache-status")
    record_batch(rig.store, batch, batch_id="cache-status", model=None, source_name=path.name)
    # When its tasks run one after another
    for line in batch.lines:
        rig.run(line.envelope.model_dump(mode="json"))
    # Then the status says four ok, two of them from the cache, through the library and the CLI
    status = batch_status(rig.store, "cache-status")
    assert (status.total, status.ok, status.pending, status.cached) == (4, 4, 0, 2)
    root = str(tmp_path / "results")
    text = run_cli("status", "cache-status", "--results", root, timeout=120)
    as_json = run_cli("status", "cache-status", "--results", root, "--json", timeout=120)
    assert text.returncode == 0 and "cached 2" in text.stdout, text.stderr
    assert json.loads(as_json.stdout)["cached"] == 2
    # And a batch submitted with --no-cache carries cache=false on every task
    assert all(not line.envelope.cache for line in without_cache(batch).lines)
    assert all(line.envelope.cache for line in batch.lines)


def _push(task: dict[str, Any], message_id: str) -> dict[str, Any]:
    data = base64.b64encode(json.dumps(task).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": message_id}, "subscription": "projects/p/s/s"}


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_push_deliveries_use_the_cache_and_metrics_count_hits_and_misses(settings: Settings, engine: Engine,
                                                                        tmp_path: Path) -> None:
    # Given the service with a results location (the Pub/Sub push door)
    runtime = build_runtime(settings, results=str(tmp_path / "push"), engine=engine)
    try:
        with BackgroundServer(create_app(runtime)) as server, httpx.Client(base_url=server.url, timeout=120) as http:
            # When an embed task is pushed, then its twin, then a greedy generate task twice
            answers = [http.post("/pubsub/push", json=_push(task, str(i))) for i, task in enumerate([
                _embed("p-1", ["pushed twice"]), _embed("p-2", ["pushed twice"]),
                _generate("p-3", "Hello"), _generate("p-4", "Hello")])]
            text = http.get("/metrics").text
    finally:
        runtime.close()
    # Then every push was settled after its write, and the twins were answered from the cache
    assert [a.json() for a in answers] == [{"outcome": "done"}] * 4
    cached = {t: json.loads((tmp_path / "push" / "adhoc" / f"{t}.json").read_text())["cached"]
              for t in ("p-1", "p-2", "p-3", "p-4")}
    assert cached == {"p-1": False, "p-2": True, "p-3": False, "p-4": True}
    # And /metrics counts one hit and one miss per kind; tokens generated count only the real run
    assert _samples(text, "gemma_cache_hits_total") == {(("kind", "embed"),): 1.0, (("kind", "generate"),): 1.0}
    assert _samples(text, "gemma_cache_misses_total") == {(("kind", "embed"),): 1.0, (("kind", "generate"),): 1.0}
    generated = json.loads((tmp_path / "push" / "adhoc" / "p-3.json").read_text())["output"]["completion_tokens"]
    assert _samples(text, "gemma_tokens_out_total") == {(): float(generated)}


@pytest.mark.emulator
@pytest.mark.slow
def test_the_pull_worker_answers_twins_from_the_cache_and_every_opt_out_holds(
        pubsub_emulator, gcs_bucket: str, gcs_client: Any, tmp_path: Path) -> None:
    # Given a `cli.py worker` pulling from the emulator and writing to the storage server
    topic, subscription = new_topic(TEST_PROJECT)
    results = f"gs://{gcs_bucket}/results"
    store = GCSStore(gcs_bucket, "results", client=gcs_client)
    batch_file = tmp_path / "batch.jsonl"
    batch_file.write_text("".join(json.dumps({"kind": "embed", "custom_id": f"l-{i}", "payload": {"texts": [text]}})
                                  + "\n" for i, text in enumerate(["pulled twice", "pulled once"])))
    worker = WorkerProcess(subscription=subscription, results=results, log_path=tmp_path / "worker.log")
    try:
        worker.wait_ready()
        # When a task runs, then a batch repeating it, the same batch with --no-cache, and `submit --no-cache`
        publish_raw(topic, [(json.dumps(_embed("pull-1", ["pulled twice"])).encode(), {})])
        assert not wait_for(store, ["adhoc/pull-1.json"], timeout=120, worker=worker)
        cli_runs = [run_cli("submit-batch", str(batch_file), "--topic", topic, "--results", results, "--batch-id",
                            batch_id, *extra, "--wait", "--timeout", "120", timeout=200)
                    for batch_id, extra in (("twins", ()), ("no-cache", ("--no-cache",)))]
        submitted = run_cli("submit", "--topic", topic, "--kind", "embed", "--text", "pulled twice", "--task-id",
                            "pull-2", "--no-cache", "--results", results, "--wait", "--timeout", "120", timeout=200)
        statuses = [json.loads(run_cli("status", b, "--results", results, "--json").stdout)
                    for b in ("twins", "no-cache")]
    finally:
        worker.stop()
    assert all(r.returncode == 0 for r in (*cli_runs, submitted)), [r.stderr for r in (*cli_runs, submitted)]
    # Then the repeat in the batch came from the cache, and nothing sent with --no-cache did
    assert [(s["ok"], s["cached"]) for s in statuses] == [(2, 1), (2, 0)]
    assert json.loads(submitted.stdout.splitlines()[-1])["cached"] is False
    # And the engine ran every task but the one twin: 1 + 1 + 2 + 1
    sizes = [r["requests"] for r in worker.records() if r.get("message") == "batch done"]
    assert sum(sizes) == 5, sizes
    # And only the two cacheable runs left entries
    assert len(list(store.list(f"{CACHE_PREFIX}/"))) == 2

    # Given a second worker on the same results, started with the cache off through its environment. It
    # pulls from a subscription of its own: once in CI a successor on the first worker's subscription got
    # nothing published after that worker stopped within 120 s (its log was not kept; the test passes
    # here), and successors on one subscription are tests/reliability's subject, not this test's.
    off_topic, off_subscription = new_topic(TEST_PROJECT)
    off = WorkerProcess(subscription=off_subscription, results=results, log_path=tmp_path / "off.log",
                        env={"GEMMA_BATCH_NO_RESULT_CACHE": "1"})
    try:
        off.wait_ready()
        # When the cached text and a new one arrive
        publish_raw(off_topic, [(json.dumps(_embed(f"off-{i}", [text])).encode(), {})
                                for i, text in enumerate(["pulled twice", "never in the cache"])])
        missing = wait_for(store, ["adhoc/off-0.json", "adhoc/off-1.json"], timeout=120, worker=off)
        assert not missing, (missing, off.log_path.read_text()[-3000:])
    finally:
        off.stop()
    # Then both ran the model, and the cache is as it was
    assert [json.loads(store.get(f"adhoc/off-{i}.json"))["cached"] for i in (0, 1)] == [False, False]
    assert sum(r["requests"] for r in off.records() if r.get("message") == "batch done") == 2
    assert len(list(store.list(f"{CACHE_PREFIX}/"))) == 2
