"""Batch files: read and validate, record, publish, follow progress, collect results in input order.

What the CLI's submit-batch, status and results commands call. In the store a batch is its manifest
`{batch_id}/_batch.json` (the tasks in input order) beside one `{batch_id}/{task_id}.json` per result.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import ValidationError

from schemas.codec import PUBSUB_MAX_MESSAGE_BYTES, validate_envelope
from schemas.envelope import SAFE_ID_PATTERN
from schemas.errors import ErrorCode, ErrorInfo, TaskError
from schemas.openai import NATIVE, AnyTask, envelope_from_openai_line, openai_output_line
from schemas.result import Result, ResultStatus

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

    from worker.store import Store

MANIFEST = "_batch.json"  # cannot clash with a result: task ids start with a letter or digit
READ_THREADS = 16
_SAFE_ID = re.compile(SAFE_ID_PATTERN)


@dataclass(frozen=True)
class BatchLine:
    """One valid line of a batch file: its envelope and the output format its result is written in."""

    line_no: int
    envelope: AnyTask
    fmt: str


@dataclass(frozen=True)
class InvalidLine:
    line_no: int
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class BatchFile:
    """A whole batch file, every line checked: submit only when `invalid` is empty."""

    lines: list[BatchLine]
    invalid: list[InvalidLine]


@dataclass(frozen=True)
class BatchStatus:
    total: int
    ok: int
    error: int
    pending: int
    first_result_at: datetime | None
    last_result_at: datetime | None
    rate_per_s: float | None
    created_at: datetime
    cached: int = 0  # of the ok results, how many came from the result cache rather than the model

    @property
    def done(self) -> bool:
        return self.pending == 0


@dataclass(frozen=True)
class CollectSummary:
    """What collect_results wrote: ok and error lines, and tasks left out because they are still pending."""

    ok: int
    error: int
    pending: int
    out: Path
    errors: Path | None


class PublishError(TaskError):
    """Some messages of a batch were not published; resubmitting the same file publishes the same task ids."""

    def __init__(self, message: str, *, published: int, failed: int) -> None:
        super().__init__(ErrorCode.PUBLISH_FAILED, message, retryable=True)
        self.published = published
        self.failed = failed


def new_batch_id() -> str:
    """A fresh, sortable batch id such as b-20261127T031500Z-3f9a (UTC time + 4 hex digits)."""
    return f"b-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def task_id_for(*, batch_id: str, custom_id: str | None, line_no: int) -> str:
    """A stable task id, so resubmitting a file under its batch id publishes the same ids (done ones are skipped)."""
    if custom_id is not None and _SAFE_ID.match(custom_id):
        return custom_id
    key = f"{batch_id}\n{custom_id if custom_id is not None else line_no}"
    return "t-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def read_batch_file(path: Path, *, batch_id: str) -> BatchFile:
    """Every non-blank line of a JSONL file as a native envelope or an OpenAI batch line, all validated.

    Invalid lines are collected with their 1-based line numbers rather than raised, so one run reports them all.
    """
    _check_batch_id(batch_id)
    lines: list[BatchLine] = []
    invalid: list[InvalidLine] = []
    claimed: dict[tuple[str, str], int] = {}
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                lines.append(_read_line(raw, line_no=line_no, batch_id=batch_id, claimed=claimed))
            except TaskError as exc:
                invalid.append(InvalidLine(line_no=line_no, code=exc.code, message=exc.message))
    return BatchFile(lines=lines, invalid=invalid)


def _read_line(raw: bytes, *, line_no: int, batch_id: str, claimed: dict[tuple[str, str], int]) -> BatchLine:
    try:
        obj = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
    except UnicodeDecodeError as exc:
        raise TaskError(ErrorCode.INVALID_ENCODING, f"line is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise TaskError(ErrorCode.INVALID_JSON, f"line is not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise TaskError(ErrorCode.NOT_AN_OBJECT, f"line must be a JSON object, got {type(obj).__name__}")
    if ("kind" in obj) == ("url" in obj):
        which = "both" if "kind" in obj else "neither"
        raise TaskError(ErrorCode.MISSING_FIELD if which == "neither" else ErrorCode.INVALID_FIELD, (
            f"line has {which} 'kind' and 'url'; a native task has 'kind', an OpenAI batch line has 'url'"))
    custom_id = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
    explicit = obj.get("task_id") if "kind" in obj else None
    task_id = explicit if explicit is not None else task_id_for(batch_id=batch_id, custom_id=custom_id,
                                                                  line_no=line_no)
    # Claim ids before validating, so a duplicate is reported even when the first line is also broken.
    for field, value in (("custom_id", custom_id), ("task_id", task_id)):
        if isinstance(value, str):
            if (first := claimed.setdefault((field, value), line_no)) != line_no:
                raise TaskError(ErrorCode.DUPLICATE_ID, f"duplicate {field} {value!r}: already used on line {first}")
    if "url" in obj:
        envelope, fmt = envelope_from_openai_line(obj, batch_id=batch_id, task_id=task_id)
    else:
        envelope, fmt = _native_envelope(obj, batch_id=batch_id, task_id=task_id), NATIVE
    size = len(envelope.model_dump_json().encode())
    if size > PUBSUB_MAX_MESSAGE_BYTES:
        raise TaskError(ErrorCode.MESSAGE_TOO_LARGE, (
            f"task is {size} bytes as a message; the Pub/Sub limit is {PUBSUB_MAX_MESSAGE_BYTES}: split its input"))
    return BatchLine(line_no=line_no, envelope=envelope, fmt=fmt)


def _native_envelope(obj: dict[str, Any], *, batch_id: str, task_id: Any) -> AnyTask:
    if obj.get("batch_id") is not None and obj["batch_id"] != batch_id:
        raise TaskError(ErrorCode.INVALID_FIELD, (
            f"batch_id {obj['batch_id']!r} differs from this batch's id {batch_id!r}; drop batch_id from the line "
            f"or submit with that batch id"))
    return validate_envelope({**obj, "task_id": task_id, "batch_id": batch_id})


def _check_batch_id(batch_id: str) -> None:
    if not isinstance(batch_id, str) or not _SAFE_ID.match(batch_id):
        raise TaskError(ErrorCode.UNSAFE_IDENTIFIER, (
            f"batch id {batch_id!r} must be 1-128 characters of letters, digits and _.:=+- starting with a letter "
            f"or digit"))


def without_cache(batch: BatchFile) -> BatchFile:
    """The same batch with every task opted out of the result cache (`submit-batch --no-cache`)."""
    lines = [replace(line, envelope=line.envelope.model_copy(update={"cache": False}))
             for line in batch.lines]
    return BatchFile(lines=lines, invalid=batch.invalid)


def record_batch(store: Store, batch: BatchFile, *, batch_id: str, model: str | None, source_name: str) -> dict:
    """Write the batch's manifest once; a resubmission of the same tasks reuses it, different tasks are refused."""
    _check_batch_id(batch_id)
    if batch.invalid:
        raise ValueError(f"{source_name} has {len(batch.invalid)} invalid line(s); fix them before recording")
    if not batch.lines:
        raise TaskError(ErrorCode.EMPTY_INPUT, f"{source_name} holds no tasks; nothing to submit")
    tasks = [{"task_id": line.envelope.task_id, "custom_id": line.envelope.custom_id, "fmt": line.fmt}
             for line in batch.lines]
    manifest = {"batch_id": batch_id, "count": len(tasks), "created_at": _iso(datetime.now(timezone.utc)),
                "model": model, "source": source_name, "tasks": tasks}
    name = f"{batch_id}/{MANIFEST}"
    if store.put_if_absent(name, json.dumps(manifest).encode()):
        return manifest
    existing = read_manifest(store, batch_id)
    if [t["task_id"] for t in existing["tasks"]] == [t["task_id"] for t in tasks]:
        return existing
    raise TaskError(ErrorCode.BATCH_CONFLICT, (
        f"batch {batch_id} already holds {existing['count']} other tasks (or the same in another order), recorded "
        f"{existing.get('created_at')} from {existing.get('source')!r} at {store.uri(name)}; submit under a new "
        f"batch id, or resubmit that same file to resume it"))


def read_manifest(store: Store, batch_id: str) -> dict:
    """A batch's manifest, or a clear error naming the batch id and where it was looked for."""
    _check_batch_id(batch_id)
    name = f"{batch_id}/{MANIFEST}"
    data = store.get(name)
    if data is None:
        raise TaskError(ErrorCode.UNKNOWN_BATCH, (
            f"no batch {batch_id!r}: {store.uri(name)} does not exist; check the batch id and the results location"))
    try:
        manifest = json.loads(data)
        if not all(isinstance(t["task_id"], str) and isinstance(t["fmt"], str) for t in manifest["tasks"]):
            raise TypeError("task entries need a task_id and a fmt")
    except (ValueError, TypeError, KeyError) as exc:
        raise TaskError(ErrorCode.INVALID_JSON, f"{store.uri(name)} is not a batch manifest ({exc!r}); "
                                                f"it may have been edited by hand") from None
    return manifest


def publish_batch(publisher: pubsub_v1.PublisherClient, topic_path: str, lines: Iterable[BatchLine], *,
                  on_published: Callable[[int], None] | None = None, max_in_flight: int = 1000) -> int:
    """Publish every line's envelope and wait for all; returns the count. on_published gets the running total.

    Up to max_in_flight publishes are outstanding at once, which bounds memory on large files.
    """
    in_flight: deque[tuple[str, Future]] = deque()
    failures: list[tuple[str, BaseException]] = []
    published = 0
    batch_ids: set[str] = set()

    def settle(task_id: str, future: Future) -> None:
        nonlocal published
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported below
            failures.append((task_id, exc))
            return
        published += 1
        if on_published is not None:
            on_published(published)

    for line in lines:
        envelope = line.envelope
        attributes = {"task_id": envelope.task_id, "kind": envelope.kind}
        if envelope.batch_id is not None:
            attributes["batch_id"] = envelope.batch_id
            batch_ids.add(envelope.batch_id)
        try:
            future = publisher.publish(topic_path, envelope.model_dump_json().encode(), **attributes)
        except Exception as exc:  # noqa: BLE001 - a stopped publisher or a rejected message counts as a failure
            failures.append((envelope.task_id, exc))
            continue
        in_flight.append((envelope.task_id, future))
        if len(in_flight) >= max_in_flight:
            settle(*in_flight.popleft())
    while in_flight:
        settle(*in_flight.popleft())
    if failures:
        task_id, first = failures[0]
        resume = f" with batch id {', '.join(sorted(batch_ids))}" if batch_ids else ""
        raise PublishError(
            f"published {published} of {published + len(failures)} tasks to {topic_path}; {len(failures)} failed "
            f"(first: task {task_id}: {first!r}). Resubmit the same file{resume}: task ids are stable and finished "
            f"tasks are skipped", published=published, failed=len(failures))
    return published


class _Progress:
    """The results of one batch seen so far. Results are create-only, so each object is read once."""

    def __init__(self, store: Store, batch_id: str) -> None:
        self.store = store
        self.batch_id = batch_id
        self.manifest = read_manifest(store, batch_id)
        self.created_at = datetime.fromisoformat(self.manifest["created_at"])
        self._wanted = {_result_name(batch_id, t["task_id"]) for t in self.manifest["tasks"]}
        self._seen: dict[str, tuple[bool, datetime | None, bool]] = {}

    def refresh(self, pool: ThreadPoolExecutor) -> BatchStatus:
        new = [n for n in self.store.list(f"{self.batch_id}/") if n in self._wanted and n not in self._seen]
        self._seen.update(zip(new, pool.map(self._read_summary, new)))
        times = [at for _, at, _ in self._seen.values() if at is not None]
        ok = sum(1 for is_ok, _, _ in self._seen.values() if is_ok)
        cached = sum(1 for is_ok, _, from_cache in self._seen.values() if is_ok and from_cache)
        first, last = (min(times), max(times)) if times else (None, None)
        elapsed = (last - self.created_at).total_seconds() if last else 0.0
        return BatchStatus(total=len(self._wanted), ok=ok, error=len(self._seen) - ok,
                           pending=len(self._wanted) - len(self._seen), first_result_at=first, last_result_at=last,
                           rate_per_s=len(self._seen) / elapsed if elapsed > 0 else None, created_at=self.created_at,
                           cached=cached)

    def _read_summary(self, name: str) -> tuple[bool, datetime | None, bool]:
        """(ok?, written at, from the result cache?) of one result; an unreadable object counts as an error."""
        try:
            obj = json.loads(self.store.get(name) or b"null")
            return (obj.get("status") == ResultStatus.OK.value, datetime.fromisoformat(obj["created_at"]),
                    obj.get("cached") is True)
        except (ValueError, TypeError, KeyError, AttributeError):
            return False, None, False


def batch_status(store: Store, batch_id: str) -> BatchStatus:
    """Counts of ok, error and pending tasks of a recorded batch, and how fast results arrive."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return _Progress(store, batch_id).refresh(pool)


def wait_for_batch(store: Store, batch_id: str, *, poll_s: float = 1.0, timeout_s: float | None,
                   on_progress: Callable[[BatchStatus], None] | None = None) -> BatchStatus:
    """Poll until no task is pending, or timeout_s passes: then the last status is returned, check `.done`.

    Each poll lists the batch and reads only results that appeared since the last one.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    progress = _Progress(store, batch_id)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        while True:
            status = progress.refresh(pool)
            if on_progress is not None:
                on_progress(status)
            left = None if deadline is None else deadline - time.monotonic()
            if status.done or (left is not None and left <= 0):
                return status
            time.sleep(poll_s if left is None else min(poll_s, left))


def collect_results(store: Store, batch_id: str, *, out: Path, errors: Path | None = None,
                    partial: bool = False) -> CollectSummary:
    """Write OpenAI-style output lines in input order; error results go to `errors` when given.

    With tasks pending and not `partial`, nothing is written. Files appear whole or not at all.
    """
    if errors is not None and Path(errors).resolve() == Path(out).resolve():
        raise ValueError(f"the errors file must differ from the output file ({out})")
    manifest = read_manifest(store, batch_id)
    present = set(store.list(f"{batch_id}/"))
    ready = [t for t in manifest["tasks"] if _result_name(batch_id, t["task_id"]) in present]
    pending = len(manifest["tasks"]) - len(ready)
    if pending and not partial:
        raise TaskError(ErrorCode.RESULTS_PENDING, (
            f"{pending} of {len(manifest['tasks'])} tasks of batch {batch_id} are still pending; wait for them "
            f"(--wait) or write what is done (--partial)"), retryable=True)
    counts = {"ok": 0, "error": 0}
    with _atomic_writer(Path(out)) as out_f, \
            (_atomic_writer(Path(errors)) if errors is not None else nullcontext(None)) as err_f, \
            ThreadPoolExecutor(READ_THREADS) as pool:
        for chunk in _chunks(ready, size=256):
            for task, result in zip(chunk, pool.map(lambda t: _load_result(store, batch_id, t), chunk)):
                line = openai_output_line(result, fmt=task["fmt"])
                kind = "ok" if line["error"] is None else "error"
                counts[kind] += 1
                target = err_f if kind == "error" and err_f is not None else out_f
                target.write(json.dumps(line, ensure_ascii=False) + "\n")
    return CollectSummary(ok=counts["ok"], error=counts["error"], pending=pending, out=Path(out),
                          errors=Path(errors) if errors is not None else None)


def _load_result(store: Store, batch_id: str, task: dict[str, Any]) -> Result:
    """A task's result; an unreadable object becomes an error result so collecting never stops on one."""
    name = _result_name(batch_id, task["task_id"])
    data = store.get(name)
    try:
        return Result.model_validate_json(data or b"")
    except ValidationError as exc:
        problem = exc.errors(include_url=False)[0]["msg"]
        error = ErrorInfo(code=ErrorCode.INTERNAL, message=f"result object {store.uri(name)} could not be read "
                                                           f"({problem}); inspect or delete it and resubmit")
        return Result(task_id=task["task_id"], custom_id=task.get("custom_id"), batch_id=batch_id,
                      status=ResultStatus.ERROR, error=error)


def _result_name(batch_id: str, task_id: str) -> str:
    return f"{batch_id}/{task_id}.json"


def _chunks(items: list[Any], *, size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextmanager
def _atomic_writer(path: Path) -> Iterator[IO[str]]:
    """A text file that replaces path only when the block succeeds, so a failed collect leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results files are for sharing
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
