"""gemma-batch command line: thin wrappers that parse, build settings and call into worker/ and jobs/."""
from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from schemas.errors import TaskError
from worker.settings import EMBEDDED_MODEL, QUANTIZE_MODES, Settings, default_cache_dir


class CliError(click.ClickException):
    """A clear one-line error for bad input or a missing resource; never a traceback."""

    exit_code = 2


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command that loads the model shares; each is also an environment variable."""
    options = [
        click.option("--model", "model", default=EMBEDDED_MODEL, show_default=True, envvar="GEMMA_BATCH_MODEL",
                     help="Model source: 'embedded', a local directory, a .gguf file, gs://bucket/prefix or a Hugging Face id."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=default_cache_dir, show_default=True,
                     envvar="GEMMA_BATCH_CACHE", help="Where converted and downloaded models are kept."),
        click.option("--device", default="auto", show_default=True, envvar="GEMMA_BATCH_DEVICE",
                     help="auto, cpu, cuda or cuda:N. CUDA asked for but absent falls back to CPU with a warning."),
        click.option("--max-input-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
                     envvar="GEMMA_BATCH_MAX_INPUT_TOKENS", help="Longest input accepted, in tokens."),
        click.option("--token-budget", type=click.IntRange(min=1), default=None, envvar="GEMMA_BATCH_TOKEN_BUDGET",
                     help="Padded tokens per forward batch (longest x count). Default: 1024 on CPU, 32768 on CUDA."),
        click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                     envvar="GEMMA_BATCH_MAX_BATCH_SIZE", help="Most inputs per forward batch."),
        click.option("--max-new-tokens-limit", "max_new_tokens_limit", type=click.IntRange(min=1), default=1024,
                     show_default=True, envvar="GEMMA_BATCH_MAX_NEW_TOKENS", help="Largest max_tokens a task may ask for."),
        click.option("--quantize", type=click.Choice(QUANTIZE_MODES), default=None, envvar="GEMMA_BATCH_QUANTIZE",
                     help="Lossy. On CPU, int4: 4-bit weights in every linear layer, generation about 1.45x and "
                          "embedding 1.5x the exact engine on an AVX2 CPU, but slower on an AVX-512/AMX one (the "
                          "load warns where its kernel loses) (cosine ~0.97 to exact; greedy text often differs); "
                          "int8: dynamic int8, embedding about 3.8x on AVX2, 1.5x on AVX-512/AMX (cosine ~0.93), "
                          "greedy text changes from the first token; bf16: the body's linear layers on bf16 weights, "
                          "for CPUs with bf16 units (AMX), where embedding ran 1.33-1.57x and generation 1.16-1.39x exact "
                          "(cosine >= 0.9999 to exact, 15 of 16 greedy texts identical; the load warns where bf16 loses). On CUDA, int8 or int4 weight-only layers through torchao, for models that would "
                          "not fit the card otherwise (docs/PERFORMANCE.md). Default: off, exact (fp32 on CPU, bf16 "
                          "on CUDA)."),
        click.option("--compile/--no-compile", "compile_", default=False, envvar="GEMMA_BATCH_COMPILE",
                     help="torch.compile the embedding forward pass, compiled at startup: on 2 CPU cores exact and "
                          "0.99-1.07x eager (30-100 s to compile); on an H200 2.6x eager, bf16 cosine 0.9997 "
                          "to eager (docs/PERFORMANCE.md). Default: off."),
        click.option("--head-screen/--no-head-screen", default=True, envvar="GEMMA_BATCH_HEAD_SCREEN",
                     help="On CPU, pick greedy tokens by scoring the vocabulary with a cheaper copy of the output "
                          "layer (bf16 where the CPU has bf16 units, with a worst-case bound; else 4-bit, with a "
                          "statistical margin) and re-scoring in fp32 the words it cannot rule out; a row without a "
                          "clear winner is scored in full. Same tokens as the full fp32 layer on every measured "
                          "prompt; greedy generation 1.25x (int4, AVX2) and 1.08-1.10x (bf16, AVX-512/AMX) in the "
                          "bench. Built once greedy work has spent as long in the full layer (0.1 s and 335 MB "
                          "bf16, 1.5 s and 105 MB int4), then kept only if it beats the full layer on this "
                          "CPU (docs/PERFORMANCE.md). Default: on; off scores every word in fp32."),
        click.option("--drafts/--no-drafts", default=True, envvar="GEMMA_BATCH_DRAFTS",
                     help="Greedy rows guess their next tokens from earlier text (the tokens that followed the "
                          "latest earlier occurrence of their last three) and the model checks the guesses in the "
                          "same step, keeping those it would have chosen itself: the same tokens in fewer steps, "
                          "most for answers that restate their prompt (docs/PERFORMANCE.md). Default: on; off "
                          "generates one token per row and step."),
        click.option("--onednn/--no-onednn", default=True, envvar="GEMMA_BATCH_ONEDNN",
                     help="On CPU, run the body's fp32 linear layers through oneDNN where a probe at load "
                          "(0.2-0.5 s) finds it faster than PyTorch's default kernel on the model's own shapes: the same "
                          "arithmetic to fp32 rounding (greedy tokens identical in the bench); on a 2-core AMD EPYC "
                          "generation 1.13-1.14x and embedding 1.01-1.07x (docs/PERFORMANCE.md). Default: on; off keeps "
                          "PyTorch's linear."),
        click.option("--log-level", default="WARNING", show_default=True, envvar="GEMMA_BATCH_LOG_LEVEL",
                     type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)),
    ]
    for option in reversed(options):
        fn = option(fn)

    @functools.wraps(fn)
    def wrapper(*, model: str, cache_dir: Path, device: str, max_input_tokens: int, token_budget: int | None,
                max_batch_size: int, max_new_tokens_limit: int, quantize: str | None, compile_: bool,
                head_screen: bool, drafts: bool, onednn: bool, log_level: str, **kwargs: Any) -> Any:
        from worker.logs import configure_logging

        configure_logging(log_level)
        try:
            settings = Settings(model=model, cache_dir=cache_dir, device=device, max_input_tokens=max_input_tokens,
                                token_budget=token_budget, max_batch_size=max_batch_size,
                                max_new_tokens=max_new_tokens_limit, quantize=quantize, compile=compile_,
                                head_screen=head_screen, drafts=drafts, onednn=onednn)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        return fn(settings=settings, **kwargs)

    return wrapper


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TaskError as exc:
            raise CliError(f"[{exc.code.value}] {exc.message}") from None
        except Exception as exc:
            # Imported only now: worker.model loads torch, which a refused argument need not wait for.
            from worker.devservices import ServiceError
            from worker.model.source import ModelSourceError

            if isinstance(exc, ModelSourceError):
                raise CliError(f"[model_unavailable] {exc}") from None
            if isinstance(exc, ServiceError):
                raise CliError(f"[{exc.code}] {exc}") from None
            raise

    return wrapper


def read_inputs(values: tuple[str, ...]) -> list[str]:
    """Arguments as given; a single '-' reads one input per line from standard input."""
    if values == ("-",):
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return list(values)


def emit(record: dict[str, Any]) -> None:
    click.echo(json.dumps(record, ensure_ascii=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gemma-batch: batched Gemma inference for Pub/Sub tasks, HTTP calls and bulk jobs."""


@main.group()
def model() -> None:
    """Find, convert and cache model checkpoints."""


@model.command("prepare")
@model_options
@guarded
def model_prepare(*, settings: Settings) -> None:
    """Convert or download the model once into the cache and print its local path."""
    from worker.model.source import prepare_model

    started = time.monotonic()
    prepared = prepare_model(settings.model, settings.cache_dir)
    action = "converted" if prepared.converted_now else "reused"
    click.echo(f"{action} {prepared.name} in {time.monotonic() - started:.2f}s", err=True)
    click.echo(str(prepared.path))


@main.command("embed")
@click.argument("texts", nargs=-1, required=True)
@click.option("--dims", type=int, default=None, help="Keep the first N dimensions (Matryoshka), re-normalised.")
@click.option("--no-normalize", is_flag=True, help="Return raw mean-pooled vectors.")
@click.option("--truncate/--no-truncate", default=False, show_default=True,
              help="Cut over-long texts at --max-input-tokens instead of failing.")
@model_options
@guarded
def embed(*, texts: tuple[str, ...], dims: int | None, no_normalize: bool, truncate: bool, settings: Settings) -> None:
    """Embed TEXT... ('-' reads lines from stdin); prints one JSON line per text, in order."""
    from worker.checks import check_texts

    inputs = read_inputs(texts)
    check_texts(inputs, what="text")  # before torch and the model load: a bad argument fails at once
    if dims is not None:  # against the width the model's config gives, before it loads
        from worker.checks import check_dims
        from worker.model.source import prepare_model

        width = prepare_model(settings.model, settings.cache_dir).hidden_size()
        if width is not None:  # else the engine checks it once loaded
            check_dims(dims, width=width)
    from worker.engine import build_engine

    engine = build_engine(settings)
    out = engine.embed(inputs, dims=dims, normalize=not no_normalize, truncate=truncate)
    for i, vector in enumerate(out.vectors):
        emit({"index": i, "model": engine.name, "dims": len(vector), "input_tokens": out.input_tokens[i],
              "truncated": out.truncated[i], "embedding": [round(float(x), 7) for x in vector]})


@main.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-tokens", type=int, default=64, show_default=True, help="New tokens per prompt.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--stop", multiple=True, help="Stop at this string (repeatable); it is not included.")
@click.option("--seed", type=int, default=None, help="Seed for sampling; same seed and prompt, same text.")
@click.option("--truncate/--no-truncate", default=False, show_default=True)
@model_options
@guarded
def generate(*, prompts: tuple[str, ...], max_tokens: int, temperature: float, top_p: float, stop: tuple[str, ...],
             seed: int | None, truncate: bool, settings: Settings) -> None:
    """Complete PROMPT... ('-' reads lines from stdin); prints one JSON line per prompt, in order."""
    from worker.checks import check_sampling, check_texts

    inputs = read_inputs(prompts)
    # before torch and the model load: a bad argument fails at once
    check_sampling(max_new_tokens=max_tokens, limit=settings.max_new_tokens, temperature=temperature, top_p=top_p,
                   stop=list(stop))
    check_texts(inputs, what="prompt")
    from worker.engine import build_engine

    engine = build_engine(settings)
    outs = engine.generate(inputs, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop=list(stop), seed=seed, truncate=truncate)
    for i, (prompt, g) in enumerate(zip(inputs, outs)):
        emit({"index": i, "model": engine.name, "prompt": prompt, "text": g.text, "finish_reason": g.finish_reason,
              "prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids), "truncated": g.truncated})


def topic_path(topic: str, project: str | None) -> str:
    """Accept `projects/P/topics/T` or a short name with --project."""
    if topic.startswith("projects/"):
        return topic
    if not project:
        raise CliError(f"topic {topic!r} is a short name: pass --project (or PUBSUB_PROJECT_ID) or projects/P/topics/T")
    return f"projects/{project}/topics/{topic}"


project_option = click.option("--project", envvar=["PUBSUB_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"], default=None,
                              help="Google Cloud project for short topic names.")


no_cache_option = click.option(
    "--no-cache", is_flag=True, envvar="GEMMA_BATCH_NO_RESULT_CACHE",
    help="Run every task through the model: neither answer from nor add to the result cache (_cache/ in --results).")


@main.command("worker")
@click.option("--subscription", required=True, envvar="GEMMA_BATCH_SUBSCRIPTION",
              help="projects/P/subscriptions/S to pull tasks from.")
@click.option("--results", required=True, envvar="GEMMA_BATCH_RESULTS",
              help="Where results go: gs://bucket/prefix or a local directory.")
@click.option("--max-wait-ms", type=click.IntRange(min=0), default=20, show_default=True,
              envvar="GEMMA_BATCH_MAX_WAIT_MS", help="How long a task waits for batch mates.")
@click.option("--max-messages", type=click.IntRange(min=1), default=256, show_default=True,
              envvar="GEMMA_BATCH_MAX_MESSAGES", help="Flow control: most messages in flight.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=100_000_000, show_default=True,
              envvar="GEMMA_BATCH_MAX_BYTES", help="Flow control: most message bytes in flight.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=5, show_default=True,
              envvar="GEMMA_BATCH_MAX_ATTEMPTS", help="Deliveries before a transient failure becomes an error result.")
@click.option("--max-message-bytes", type=click.IntRange(min=1), default=10_000_000, show_default=True,
              envvar="GEMMA_BATCH_MAX_MESSAGE_BYTES", help="Larger messages get a message_too_large error result.")
@no_cache_option
@model_options
@guarded
def worker(*, subscription: str, results: str, max_wait_ms: int, max_messages: int, max_bytes: int,
           max_attempts: int, max_message_bytes: int, no_cache: bool, settings: Settings) -> None:
    """Pull tasks, run them in batches, write results, then ack. SIGTERM or Ctrl-C stops it in order."""
    import dataclasses

    from worker.app import exit_process, run_pull_worker

    settings = dataclasses.replace(settings, max_wait_ms=max_wait_ms, flow_max_messages=max_messages,
                                   flow_max_bytes=max_bytes, max_attempts=max_attempts,
                                   max_message_bytes=max_message_bytes, result_cache=not no_cache)
    run_pull_worker(settings, subscription=subscription, results=results)
    exit_process(0)


@main.command("submit")
@click.option("--topic", required=True, envvar="GEMMA_BATCH_TOPIC", help="projects/P/topics/T or a short name.")
@project_option
@click.option("--kind", type=click.Choice(["embed", "generate"]), required=True)
@click.option("--text", "texts", multiple=True, help="Text to embed (repeatable).")
@click.option("--prompt", default=None, help="Prompt to complete.")
@click.option("--max-tokens", type=int, default=None, help="New tokens for generate.")
@click.option("--temperature", type=float, default=None)
@click.option("--dims", type=int, default=None)
@click.option("--task-id", default=None, help="Idempotency key; default: a new random id.")
@click.option("--batch-id", default=None)
@click.option("--custom-id", default=None)
@click.option("--no-cache", is_flag=True, help="Always run the model for this task, and do not cache its result.")
@click.option("--results", default=None, envvar="GEMMA_BATCH_RESULTS", help="With --wait: where to look for the result.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds --wait waits.")
@guarded
def submit(*, topic: str, project: str | None, kind: str, texts: tuple[str, ...], prompt: str | None,
           max_tokens: int | None, temperature: float | None, dims: int | None, task_id: str | None,
           batch_id: str | None, custom_id: str | None, no_cache: bool, results: str | None, wait: bool,
           timeout: float) -> None:
    """Publish one task and print its task id (with --wait, then its result)."""
    import uuid

    from google.cloud import pubsub_v1

    from schemas.codec import validate_envelope

    if kind == "embed":
        payload: dict[str, Any] = {"texts": list(texts), **({"dims": dims} if dims is not None else {})}
    else:
        payload = {"prompt": prompt, **{k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature))
                                        if v is not None}}
    raw = {"task_id": task_id or f"t-{uuid.uuid4().hex}", "kind": kind, "payload": payload,
           **{k: v for k, v in (("batch_id", batch_id), ("custom_id", custom_id)) if v is not None},
           **({"cache": False} if no_cache else {})}
    envelope = validate_envelope(raw)
    if wait and not results:
        raise CliError("--wait needs --results (or GEMMA_BATCH_RESULTS) to know where the result will be")
    publisher = pubsub_v1.PublisherClient()
    attributes = {"task_id": envelope.task_id, "kind": envelope.kind, **({"batch_id": batch_id} if batch_id else {})}
    publisher.publish(topic_path(topic, project), envelope.model_dump_json().encode(), **attributes).result(timeout=60)
    click.echo(envelope.task_id)
    if wait:
        from worker.runner import result_name
        from worker.store import open_store

        store = open_store(results)
        name = result_name(envelope.batch_id, envelope.task_id)
        deadline = time.monotonic() + timeout
        while (body := store.get(name)) is None:
            if time.monotonic() > deadline:
                raise CliError(f"no result at {store.uri(name)} after {timeout:.0f}s; is a worker running?")
            time.sleep(0.5)
        click.echo(body.decode())


@main.command("submit-batch")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--topic", required=True, envvar="GEMMA_BATCH_TOPIC", help="projects/P/topics/T or a short name.")
@project_option
@click.option("--results", required=True, envvar="GEMMA_BATCH_RESULTS",
              help="The worker's results location; the batch record is written there.")
@click.option("--batch-id", default=None, help="Default: a new id. Resubmitting a file under its batch id resumes it.")
@click.option("--model", "model_name", default=None, envvar="GEMMA_BATCH_MODEL", help="Recorded in batch.json.")
@click.option("--skip-invalid", is_flag=True, help="Publish the valid lines even if some are invalid.")
@click.option("--no-cache", is_flag=True, help="Always run the model for these tasks, and do not cache their results.")
@click.option("--wait", is_flag=True, help="Show progress until every result exists.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits (default: no limit).")
@guarded
def submit_batch(*, file: Path, topic: str, project: str | None, results: str, batch_id: str | None,
                 model_name: str | None, skip_invalid: bool, no_cache: bool, wait: bool, timeout: float | None) -> None:
    """Validate every line of FILE (native envelopes or OpenAI batch lines), record the batch, publish it,
    and print the batch id."""
    from google.cloud import pubsub_v1

    from worker import batches
    from worker.store import open_store

    batch_id = batch_id or batches.new_batch_id()
    batch = batches.read_batch_file(file, batch_id=batch_id)
    for bad in batch.invalid:
        click.echo(f"{file}:{bad.line_no}: [{bad.code.value}] {bad.message}", err=True)
    if batch.invalid and not skip_invalid:
        raise CliError(f"{len(batch.invalid)} invalid line(s) in {file}; nothing was published "
                       "(fix them, or pass --skip-invalid to publish the rest)")
    if batch.invalid:
        batch = batches.BatchFile(lines=batch.lines, invalid=[])
    if no_cache:
        batch = batches.without_cache(batch)
    store = open_store(results)
    batches.record_batch(store, batch, batch_id=batch_id, model=model_name, source_name=file.name)
    publisher = pubsub_v1.PublisherClient()
    with click.progressbar(length=len(batch.lines), label="publishing", file=sys.stderr) as bar:
        batches.publish_batch(publisher, topic_path(topic, project), batch.lines,
                              on_published=lambda n: bar.update(n - bar.pos))
    click.echo(batch_id)
    if wait:
        status = _wait_with_progress(store, batch_id, timeout=timeout)
        click.echo(_status_line(status), err=True)
        if not status.done:
            raise CliError(f"{status.pending} tasks still pending after {timeout}s")


def _wait_with_progress(store: Any, batch_id: str, *, timeout: float | None) -> Any:
    from worker import batches

    first = batches.batch_status(store, batch_id)
    with click.progressbar(length=first.total, label=f"batch {batch_id}", file=sys.stderr,
                           show_pos=True, show_eta=True) as bar:
        def progress(status: Any) -> None:
            bar.update(status.ok + status.error - bar.pos)

        progress(first)
        return batches.wait_for_batch(store, batch_id, timeout_s=timeout, on_progress=progress)


def _status_line(status: Any) -> str:
    rate = f"{status.rate_per_s:.2f}/s" if status.rate_per_s else "n/a"
    return (f"total {status.total}  ok {status.ok}  error {status.error}  pending {status.pending}  "
            f"cached {status.cached}  rate {rate}")


@main.command("status")
@click.argument("batch_id")
@click.option("--results", required=True, envvar="GEMMA_BATCH_RESULTS", help="The results location.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@guarded
def status(*, batch_id: str, results: str, as_json: bool) -> None:
    """Print done (ok / error) and pending counts of a batch, how many ok ones came from the result
    cache, and its rate."""
    import dataclasses

    from worker import batches
    from worker.store import open_store

    current = batches.batch_status(open_store(results), batch_id)
    click.echo(json.dumps(dataclasses.asdict(current), default=str) if as_json else _status_line(current))


@main.command("results")
@click.argument("batch_id")
@click.option("--results", required=True, envvar="GEMMA_BATCH_RESULTS", help="The results location.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write OpenAI-style output lines, in input order.")
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write error lines here instead of into --output.")
@click.option("--partial", is_flag=True, help="Write what is done even if tasks are pending.")
@guarded
def results_cmd(*, batch_id: str, results: str, out: Path, errors: Path | None, partial: bool) -> None:
    """Collect a batch's results as OpenAI batch output lines (id, custom_id, response, error)."""
    from worker import batches
    from worker.store import open_store

    summary = batches.collect_results(open_store(results), batch_id, out=out, errors=errors, partial=partial)
    where = f"{out}" + (f" and {errors}" if errors else "")
    click.echo(f"wrote {summary.ok} ok and {summary.error} error lines to {where}"
               + (f"; {summary.pending} pending left out" if summary.pending else ""), err=True)


@main.command("setup-pubsub")
@click.option("--project", required=True, envvar=["PUBSUB_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"])
@click.option("--topic", required=True, envvar="GEMMA_BATCH_TOPIC", help="Short topic name.")
@click.option("--subscription", required=True, help="Short name of the worker's pull subscription.")
@click.option("--ack-deadline", type=click.IntRange(10, 600), default=60, show_default=True,
              help="Seconds; the worker extends leases while it works.")
@click.option("--dead-letter-topic", default=None, help="Park messages here after --max-delivery-attempts.")
@click.option("--max-delivery-attempts", type=click.IntRange(5, 100), default=5, show_default=True)
@click.option("--retry-backoff", type=(click.IntRange(0, 600), click.IntRange(0, 600)), default=None,
              help="MIN MAX seconds before a nacked message comes back (exponential); default: at once.")
@guarded
def setup_pubsub(*, project: str, topic: str, subscription: str, ack_deadline: int, dead_letter_topic: str | None,
                 max_delivery_attempts: int, retry_backoff: tuple[int, int] | None) -> None:
    """Create the task topic and the worker's subscription (and a dead-letter topic), unless they exist."""
    from worker.devservices import ensure_subscription, ensure_topic

    click.echo(ensure_topic(project, topic))
    if dead_letter_topic:
        click.echo(ensure_topic(project, dead_letter_topic))
    click.echo(ensure_subscription(project, topic, subscription, ack_deadline_seconds=ack_deadline,
                                   dead_letter_topic=dead_letter_topic, max_delivery_attempts=max_delivery_attempts,
                                   retry_backoff_s=retry_backoff))


@main.group()
def dev() -> None:
    """Local Pub/Sub emulator and storage server on 127.0.0.1, for trying things out."""


dev_state_option = click.option("--state-dir", type=click.Path(path_type=Path), envvar="GEMMA_BATCH_DEV_DIR",
                                default=lambda: default_cache_dir() / "dev", show_default="~/.cache/gemma-batch/dev",
                                help="Where the running services are recorded.")


@dev.command("up")
@dev_state_option
@click.option("--project", default="local-dev", show_default=True, envvar="PUBSUB_PROJECT_ID")
@guarded
def dev_up_cmd(*, state_dir: Path, project: str) -> None:
    """Start both (or reuse running ones) and print the environment to export."""
    from worker.devservices import dev_up

    for key, value in dev_up(state_dir, project=project).items():
        click.echo(f"export {key}={value}")


@dev.command("down")
@dev_state_option
def dev_down_cmd(*, state_dir: Path) -> None:
    """Stop what `dev up` started."""
    from worker.devservices import dev_down

    click.echo("stopped" if dev_down(state_dir) else "nothing was running")


@dev.command("status")
@dev_state_option
def dev_status_cmd(*, state_dir: Path) -> None:
    """Print what `dev up` started and whether it still runs."""
    from worker.devservices import dev_status

    click.echo(json.dumps(dev_status(state_dir), indent=2, default=str))


@main.command("serve")
@click.option("--host", default="0.0.0.0", show_default=True, envvar="GEMMA_BATCH_HOST",
              help="Address to bind; 127.0.0.1 keeps it on this machine.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, envvar="PORT",
              help="Port to listen on (Cloud Run sets PORT).")
@click.option("--results", default=None, envvar="GEMMA_BATCH_RESULTS",
              help="Where push and pull results go: gs://bucket/prefix or a local directory. Without it, "
                   "/pubsub/push answers 501 and only the synchronous routes work.")
@click.option("--subscription", default=None, envvar="GEMMA_BATCH_SUBSCRIPTION",
              help="Also pull tasks from projects/P/subscriptions/S, on the same model and batcher (needs --results).")
@click.option("--max-wait-ms", type=click.IntRange(min=0), default=20, show_default=True,
              envvar="GEMMA_BATCH_MAX_WAIT_MS", help="How long a request waits for batch mates.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=16 * 1024 * 1024, show_default=True,
              envvar="GEMMA_BATCH_MAX_REQUEST_BYTES", help="Larger request bodies get 413.")
@click.option("--max-texts-per-request", type=click.IntRange(min=1), default=256, show_default=True,
              envvar="GEMMA_BATCH_MAX_TEXTS", help="Most texts in one embed request or task (413 above).")
@click.option("--max-queued-requests", type=click.IntRange(min=1), default=256, show_default=True,
              envvar="GEMMA_BATCH_MAX_QUEUED_REQUESTS", help="Inference and push requests in flight; more get 429.")
@click.option("--retry-after", "retry_after_s", type=click.IntRange(min=1), default=1, show_default=True,
              envvar="GEMMA_BATCH_RETRY_AFTER", help="Seconds sent in Retry-After with 429 and 503.")
@click.option("--push-audience", default=None, envvar="GEMMA_BATCH_PUSH_AUDIENCE",
              help="Require a Google-signed OIDC token for this audience on /pubsub/push (401/403 otherwise).")
@click.option("--push-service-account", default=None, envvar="GEMMA_BATCH_PUSH_SERVICE_ACCOUNT",
              help="With --push-audience: the token must also be this verified email (the push service account).")
@click.option("--oidc-certs-url", default="https://www.googleapis.com/oauth2/v1/certs", show_default=True,
              envvar="GEMMA_BATCH_OIDC_CERTS_URL", help="Where the token signing certificates are fetched.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=5, show_default=True,
              envvar="GEMMA_BATCH_MAX_ATTEMPTS", help="Deliveries before a transient failure becomes an error result.")
@no_cache_option
@model_options
@guarded
def serve(*, host: str, port: int, results: str | None, subscription: str | None, max_wait_ms: int,
          max_request_bytes: int, max_texts_per_request: int, max_queued_requests: int, retry_after_s: int,
          push_audience: str | None, push_service_account: str | None, oidc_certs_url: str, max_attempts: int,
          no_cache: bool, settings: Settings) -> None:
    """Serve HTTP: /healthz, /readyz, /generate, /embed, /graph, /code, /v1/... (OpenAI), /pubsub/push, /metrics.

    The model loads in the background, so /healthz answers at once. SIGTERM stops the pull worker, then
    lets requests in flight finish."""
    import dataclasses

    from worker.app import exit_process
    from worker.auth import PushAuthConfig
    from worker.service import ServiceConfig, ServiceLimits
    from worker.service_run import run_service

    if subscription and not results:
        raise CliError("--subscription needs --results (or GEMMA_BATCH_RESULTS): pulled tasks write results there")
    if push_service_account and not push_audience:
        raise CliError("--push-service-account needs --push-audience: the token is checked for both")
    settings = dataclasses.replace(settings, max_wait_ms=max_wait_ms, max_texts_per_task=max_texts_per_request,
                                   max_attempts=max_attempts, result_cache=not no_cache)
    limits = ServiceLimits(max_request_bytes=max_request_bytes, max_texts=max_texts_per_request,
                           max_queued_requests=max_queued_requests, retry_after_s=retry_after_s)
    push_auth = PushAuthConfig(audience=push_audience, service_account=push_service_account,
                               certs_url=oidc_certs_url) if push_audience else None
    run_service(settings, results=results, host=host, port=port,
                config=ServiceConfig(limits=limits, push_auth=push_auth, subscription=subscription))
    exit_process(0)


@main.command("demo")
@click.option("--texts", "n_texts", type=click.IntRange(min=1), default=300, show_default=True,
              help="How many standard-library docstrings to embed.")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=0), default=8, show_default=True,
              help="How many completion and chat tasks to add.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"),
              show_default=True, help="Where the batch file, collected results and worker log go.")
@click.option("--engine-only", is_flag=True, help="Skip Pub/Sub and storage: call the engine directly.")
@model_options
@guarded
def demo(*, n_texts: int, n_prompts: int, out_dir: Path, engine_only: bool, settings: Settings) -> None:
    """Run the main job on the embedded default: emulator, storage server, worker, a real batch."""
    from worker.demo import run_engine_demo, run_pipeline_demo

    if engine_only:
        run_engine_demo(settings, n_texts=n_texts, echo=click.echo)
    else:
        run_pipeline_demo(settings, n_embed=n_texts, n_generate=n_prompts, out_dir=out_dir, echo=click.echo)


@main.command("bench", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(*, args: tuple[str, ...]) -> None:
    """Measure the engine against its peers in one run (python -m bench; --help for its options)."""
    from bench.__main__ import PeerMissing, main as bench_main

    try:
        bench_main(list(args))
    except PeerMissing as exc:
        raise click.ClickException(str(exc)) from None


def reembed_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `reembed` (local runner) and `reembed-task` (one Cloud Run task)."""
    options = [
        click.option("--nodes", required=True, envvar="GEMMA_BATCH_NODES",
                     help="Node file (.jsonl or .parquet), directory or prefix; local path or gs://bucket/prefix."),
        click.option("--out", required=True, envvar="GEMMA_BATCH_EMBEDDINGS",
                     help="Where runs go: gs://bucket/prefix or a local directory."),
        click.option("--run-id", default=None, envvar="GEMMA_BATCH_RUN_ID",
                     help="Run id shared by all tasks. Default: $CLOUD_RUN_EXECUTION, else a new one."),
        click.option("--previous", default=None, envvar="GEMMA_BATCH_PREVIOUS_RUN",
                     help="Run whose vectors are reused for unchanged nodes; 'none' embeds all. Default: latest."),
        click.option("--dims", type=click.IntRange(min=1), default=None, help="Keep the first N dimensions."),
        click.option("--strict", is_flag=True, help="Fail on any invalid node line instead of counting it."),
        click.option("--id-field", default="id", show_default=True, help="Field (or column) holding the node id."),
        click.option("--text-field", default="text", show_default=True, help="Field (or column) holding the text."),
        click.option("--chunk-rows", type=click.IntRange(min=1), default=256, show_default=True,
                     envvar="GEMMA_BATCH_CHUNK_ROWS", help="Rows per checkpoint; a retry redoes at most one chunk."),
        click.option("--task-timeout", type=click.FloatRange(min=1), default=None, envvar="CLOUD_RUN_TASK_TIMEOUT",
                     help="Seconds a task may run (the job's timeoutSeconds); it checkpoints and exits before."),
        click.option("--timeout-margin", type=click.FloatRange(min=0), default=None,
                     help="Seconds kept free before --task-timeout. Default: 10% of it, at most 120."),
        click.option("--progress-interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                     envvar="GEMMA_BATCH_PROGRESS_INTERVAL", help="Seconds between progress log lines."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def reembed_config(**kwargs: Any) -> Any:
    from jobs.reembed import JobConfig

    return JobConfig(nodes=kwargs["nodes"], out=kwargs["out"], run_id=kwargs["run_id"] or "",
                     previous=kwargs["previous"], dims=kwargs["dims"], strict=kwargs["strict"],
                     id_field=kwargs["id_field"], text_field=kwargs["text_field"], chunk_rows=kwargs["chunk_rows"],
                     task_timeout_s=kwargs["task_timeout"], timeout_margin_s=kwargs["timeout_margin"],
                     progress_interval_s=kwargs["progress_interval"])


def settings_env(settings: Settings) -> dict[str, str]:
    """The model options as the environment variables a child `reembed-task` reads them from."""
    values = {"GEMMA_BATCH_MODEL": settings.model, "GEMMA_BATCH_CACHE": str(settings.cache_dir),
              "GEMMA_BATCH_DEVICE": settings.device, "GEMMA_BATCH_MAX_INPUT_TOKENS": settings.max_input_tokens,
              "GEMMA_BATCH_TOKEN_BUDGET": settings.token_budget, "GEMMA_BATCH_MAX_BATCH_SIZE": settings.max_batch_size,
              "GEMMA_BATCH_QUANTIZE": settings.quantize, "GEMMA_BATCH_COMPILE": "true" if settings.compile else None,
              "GEMMA_BATCH_HEAD_SCREEN": None if settings.head_screen else "false",
              "GEMMA_BATCH_DRAFTS": None if settings.drafts else "false",
              "GEMMA_BATCH_ONEDNN": None if settings.onednn else "false"}
    return {k: str(v) for k, v in values.items() if v is not None}


def job_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A re-embedding error as one line: [code] message (and whether running again helps)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from jobs.errors import JobError

        try:
            return fn(*args, **kwargs)
        except JobError as exc:
            again = " (running the same command again may succeed)" if exc.retryable else ""
            raise CliError(f"[{exc.code}] {exc.message}{again}") from None

    return wrapper


@main.command("reembed")
@reembed_options
@click.option("--tasks", type=click.IntRange(min=1, max=1000), default=1, show_default=True,
              help="Task processes, each one shard (CLOUD_RUN_TASK_COUNT).")
@click.option("--max-retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retries per failed task, as the Cloud Run job's maxRetries.")
@model_options
@guarded
@job_errors
def reembed(*, tasks: int, max_retries: int, settings: Settings, **options: Any) -> None:
    """Re-embed every node on this machine with N task processes, exactly as the Cloud Run job does."""
    import dataclasses

    from jobs.local import run_local
    from jobs.progress import ProgressView
    from jobs.reembed import new_run_id

    config = reembed_config(**options)
    config = dataclasses.replace(config, run_id=config.run_id or new_run_id())
    click.echo(f"run {config.run_id}: {tasks} task(s) over {config.nodes} -> {config.out}", err=True)
    view = ProgressView(label=f"run {config.run_id}", interval_s=config.progress_interval_s)
    try:
        result = run_local(config, task_command=[sys.executable, str(Path(__file__).resolve()), "reembed-task"],
                           tasks=tasks, max_retries=max_retries, env=settings_env(settings),
                           on_progress=lambda c: view.update(c.done, c.total))
    finally:
        view.close()
    m = result.manifest
    retried = {i: len(h) - 1 for i, h in result.attempts.items() if len(h) > 1}
    emit({"run_id": m["run_id"], "nodes": m["node_count"], "embedded": m["embedded"], "reused": m["reused"],
          "invalid": m["invalid"]["count"], "truncated": m["truncated"], "duration_s": m["duration_s"],
          "retries": retried, "manifest": f"{config.out.rstrip('/')}/{m['run_id']}/_MANIFEST.json"})


@main.command("reembed-task")
@reembed_options
@model_options
def reembed_task(*, settings: Settings, **options: Any) -> None:
    """One task of a re-embedding run (the Cloud Run job's command); CLOUD_RUN_TASK_* pick its shard.

    Exits 0 when its shard is written, 75 when a retry can continue (time budget, storage), 2 otherwise."""
    from jobs.reembed import run_task_command

    def load_engine() -> Any:
        from worker.engine import build_engine  # torch loads only once the nodes are known to be usable

        return build_engine(settings)

    sys.exit(run_task_command(reembed_config(**options), engine_factory=load_engine))


@main.command("reembed-status")
@click.option("--out", required=True, envvar="GEMMA_BATCH_EMBEDDINGS", help="The runs' location (as for reembed).")
@click.option("--run", "run_id", default=None, help="Show this run's progress instead of the latest finished run.")
@guarded
@job_errors
def reembed_status(*, out: str, run_id: str | None) -> None:
    """Print the run `latest` names and its manifest (or, with --run, how far that run is) as JSON."""
    from jobs.runs import read_latest, read_manifest, run_status
    from worker.store import open_store

    store = open_store(out)
    if run_id:
        click.echo(json.dumps(run_status(store, run_id), indent=2))
        return
    pointer = read_latest(store)
    if pointer is None:
        raise CliError(f"no finished run at {out} yet (no 'latest' pointer); run `reembed` first")
    click.echo(json.dumps({"latest": pointer, "manifest": read_manifest(store, pointer["run_id"])}, indent=2))


if __name__ == "__main__":
    main()
