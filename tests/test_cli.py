"""The CLI as a user runs it: one JSON line per input, clear errors, help everywhere."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from worker.engine import Engine

COMMANDS = [[], ["model"], ["model", "prepare"], ["embed"], ["generate"], ["demo"], ["worker"], ["submit"],
            ["submit-batch"], ["status"], ["results"], ["setup-pubsub"], ["dev"], ["dev", "up"], ["dev", "down"],
            ["dev", "status"], ["serve"], ["reembed"], ["reembed-task"], ["reembed-status"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_every_command_has_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_embed_prints_one_json_line_per_text_equal_to_the_engine(engine: Engine) -> None:
    # Given two texts / When embedded through the CLI with --dims 64
    texts = ["Pub/Sub delivers at least once.", "Cloud Storage keeps results."]
    result = run_cli("embed", *texts, "--dims", "64", "--device", "cpu")
    # Then two JSON lines, in order, equal to the engine's vectors
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    expected = engine.embed(texts, dims=64).vectors
    got = np.array([line["embedding"] for line in lines], dtype=np.float32)
    assert got.shape == (2, 64) and np.sum(got * expected, axis=1).min() >= 0.9999


def test_generate_reads_prompts_from_stdin_and_prints_json_lines(engine: Engine) -> None:
    # Given two prompts on standard input / When generated greedily through the CLI
    prompts = ["The capital of France is", "def add(a, b):"]
    result = run_cli("generate", "-", "--max-tokens", "8", "--device", "cpu", input="\n".join(prompts) + "\n")
    # Then one line per prompt, in order, with the engine's text
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    expected = engine.generate(prompts, max_new_tokens=8)
    assert [line["text"] for line in lines] == [g.text for g in expected]
    assert all(line["completion_tokens"] == 8 or line["finish_reason"] == "stop" for line in lines)


def test_quantize_int4_reaches_the_engine_from_the_command_line(engine: Engine) -> None:
    # Given texts embedded through the CLI with --quantize int4 on CPU
    texts = ["Pub/Sub delivers at least once.", "Cloud Storage keeps results.", "def add(a, b): return a + b"]
    result = run_cli("embed", *texts, "--quantize", "int4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    got = np.array([json.loads(line)["embedding"] for line in result.stdout.splitlines()], dtype=np.float32)
    # Then the vectors are the lossy mode's: close to the exact ones, yet not equal to them
    cosines = np.sum(got * engine.embed(texts).vectors, axis=1)
    assert got.shape == (3, 640) and cosines.min() > 0.9 and cosines.max() < 0.9999


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["embed", "hello", "--dims", "0"], "[invalid_parameter] dims must be an integer from 1 to 640"),
        (["embed", "x", "--model", "/nowhere/model.gguf"], "[model_unavailable]"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(args: list[str], words: str) -> None:
    # Given a bad argument / When run / Then exit code 2, the reason on stderr, and no traceback
    result = run_cli(*args, "--device", "cpu")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_dims_beyond_the_models_width_is_refused_before_the_model_loads() -> None:
    # Given --dims one past the embedded model's width (640, from its config.json)
    result = run_cli("embed", "hello", "--dims", "641", "--device", "cpu", "--log-level", "INFO")
    # Then exit code 2 and the engine's own message, and no model was loaded to find it out
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "[invalid_parameter] dims must be an integer from 1 to 640 (the model's width), got 641" in result.stderr
    assert "loaded on cpu" not in result.stderr and "Traceback" not in result.stderr and not result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["embed", ""], "[empty_input] text 0 is empty"),
        (["embed", "a", " "], "[empty_input] text 1 is empty"),
        (["generate", "hi", ""], "[empty_input] prompt 1 is empty"),
        (["generate", "hi", "--max-tokens", "-2"], "[max_tokens_out_of_range]"),
        (["generate", "hi", "--temperature", "-1"], "[invalid_parameter] temperature must be a finite number >= 0"),
        (["generate", "hi", "--temperature", "1e-9"], "temperature must be 0 (greedy) or at least"),
        (["generate", "hi", "--top-p", "0"], "[invalid_parameter] top_p must be in (0, 1]"),
        (["generate", "hi", "--stop", ""], "[invalid_parameter] stop strings must be non-empty"),
    ],
)
def test_arguments_that_need_no_model_are_refused_before_it_is_looked_for(args: list[str], words: str) -> None:
    # Given a bad argument the model plays no part in, and a model that does not exist
    # When run / Then exit code 2 and one clear line naming the argument: it was checked before the
    # model was looked for (a user waits for no model load to learn of a typo)
    result = run_cli(*args, "--model", "/nowhere/model.gguf", "--device", "cpu")
    assert result.returncode == 2 and words in result.stderr, (result.stdout, result.stderr)
    assert "model_unavailable" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.emulator
def test_setup_pubsub_creates_topic_subscription_and_dead_letter_policy(pubsub_emulator) -> None:
    # Given the emulator / When setup-pubsub runs twice (the second time finds everything in place)
    from google.cloud import pubsub_v1

    args = ["setup-pubsub", "--project", "test-project", "--topic", "cli-tasks", "--subscription", "cli-worker",
            "--dead-letter-topic", "cli-dead", "--max-delivery-attempts", "7", "--retry-backoff", "10", "600"]
    first, second = run_cli(*args), run_cli(*args)
    # Then both succeed and the subscription carries the dead-letter and retry policies
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    client = pubsub_v1.SubscriberClient()
    sub = client.get_subscription(subscription="projects/test-project/subscriptions/cli-worker")
    client.close()
    assert sub.dead_letter_policy.dead_letter_topic == "projects/test-project/topics/cli-dead"
    assert sub.dead_letter_policy.max_delivery_attempts == 7
    assert sub.retry_policy.minimum_backoff.seconds == 10
