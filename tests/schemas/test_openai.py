from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from schemas import EmbedOutput, EmbedTask, ErrorCode, ErrorInfo, GenerateOutput, GenerateTask, Result, TaskError
from schemas.openai import envelope_from_openai_line, openai_output_line, render_gemma_chat

WHEN = datetime(2026, 11, 27, 3, 15, tzinfo=timezone.utc)


def _line(url: str, body: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {"custom_id": "req-1", "method": "POST", "url": url, "body": body, **overrides}


def _error(obj: Any) -> TaskError:
    with pytest.raises(TaskError) as caught:
        envelope_from_openai_line(obj, batch_id="b-1", task_id="t-1")
    return caught.value


def test_embeddings_line_maps_input_and_dimensions() -> None:
    # Given an embeddings line with a list input and dimensions
    obj = _line("/v1/embeddings", {"model": "ignored", "input": ["a", "b"], "dimensions": 64,
                                   "encoding_format": "float"})
    # When mapped
    envelope, fmt = envelope_from_openai_line(obj, batch_id="b-1", task_id="t-1")
    # Then it is an embed task with the texts, dims, ids and format tag
    assert fmt == "embeddings"
    assert isinstance(envelope, EmbedTask)
    assert envelope.payload.texts == ["a", "b"] and envelope.payload.dims == 64
    assert (envelope.task_id, envelope.batch_id, envelope.custom_id) == ("t-1", "b-1", "req-1")


def test_embeddings_single_string_becomes_one_text() -> None:
    # Given an embeddings line whose input is one string / When mapped
    envelope, _ = envelope_from_openai_line(_line("/v1/embeddings", {"input": "hello"}), batch_id="b", task_id="t")
    # Then it is one text
    assert envelope.payload.texts == ["hello"]


def test_completions_line_maps_sampling_parameters() -> None:
    # Given a completions line with every supported parameter
    body = {"prompt": "Once", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 3}
    # When mapped
    envelope, fmt = envelope_from_openai_line(_line("/v1/completions", body), batch_id="b", task_id="t")
    # Then each parameter lands on the generate payload, a single stop becoming a list
    assert fmt == "completions" and isinstance(envelope, GenerateTask)
    p = envelope.payload
    assert (p.prompt, p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == ("Once", 7, 0.5, 0.9, ["\n"], 3)


def test_absent_temperature_means_greedy() -> None:
    # Given a completions line without temperature / When mapped
    envelope, _ = envelope_from_openai_line(_line("/v1/completions", {"prompt": "x"}), batch_id="b", task_id="t")
    # Then temperature is 0, unlike OpenAI's default of 1
    assert envelope.payload.temperature == 0.0


def test_chat_line_renders_gemma_prompt_and_takes_max_completion_tokens() -> None:
    # Given a chat line with a system message and max_completion_tokens
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_completion_tokens": 12, "stop": ["a", "b"]}
    # When mapped
    envelope, fmt = envelope_from_openai_line(_line("/v1/chat/completions", body), batch_id="b", task_id="t")
    # Then the prompt is Gemma's chat format and max_tokens comes from max_completion_tokens
    assert fmt == "chat.completions"
    assert envelope.payload.prompt == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert envelope.payload.max_tokens == 12 and envelope.payload.stop == ["a", "b"]


def test_render_gemma_chat_multi_turn_with_parts_and_developer() -> None:
    # Given a developer message, text parts, an assistant turn and a follow-up
    messages = [
        {"role": "user", "content": [{"type": "text", "text": " Hello "}, {"type": "text", "text": "there"}]},
        {"role": "developer", "content": "Answer in French."},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Again"},
    ]
    # When rendered
    prompt = render_gemma_chat(messages)
    # Then the developer text opens the first user turn, assistant is "model", and the model's turn is open
    assert prompt == (
        "<start_of_turn>user\nAnswer in French.\n\nHello\nthere<end_of_turn>\n"
        "<start_of_turn>model\nBonjour<end_of_turn>\n"
        "<start_of_turn>user\nAgain<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert not prompt.startswith("<bos>")


def test_render_gemma_chat_merges_consecutive_turns_of_one_role() -> None:
    # Given two user messages in a row / When rendered
    prompt = render_gemma_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # Then they form one user turn, as Gemma expects alternating turns
    assert prompt == "<start_of_turn>user\na\n\nb<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize(("obj", "code", "needle"), [
    ([1, 2], ErrorCode.NOT_AN_OBJECT, "JSON object"),
    (_line("/v1/responses", {"input": "x"}), ErrorCode.INVALID_FIELD, "/v1/embeddings"),
    (_line("/v1/embeddings", {"input": "x"}, method="GET"), ErrorCode.INVALID_FIELD, "POST"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/embeddings"}, ErrorCode.MISSING_FIELD, "body"),
    ({"method": "POST", "url": "/v1/embeddings", "body": {}}, ErrorCode.MISSING_FIELD, "custom_id"),
    (_line("/v1/embeddings", {"input": "x"}, extra=1), ErrorCode.INVALID_FIELD, "extra"),
    (_line("/v1/embeddings", {}), ErrorCode.MISSING_FIELD, "body.input"),
    (_line("/v1/embeddings", {"input": []}), ErrorCode.EMPTY_INPUT, "body.input"),
    (_line("/v1/embeddings", {"input": ["ok", ""]}), ErrorCode.EMPTY_INPUT, "body.input.1"),
    (_line("/v1/embeddings", {"input": [[1, 2]]}), ErrorCode.INVALID_FIELD, "token ids"),
    (_line("/v1/embeddings", {"input": 5}), ErrorCode.INVALID_FIELD, "string"),
    (_line("/v1/embeddings", {"input": "x", "encoding_format": "base64"}), ErrorCode.INVALID_PARAMETER, "float"),
    (_line("/v1/embeddings", {"input": "x", "dimensions": 0}), ErrorCode.INVALID_PARAMETER, "body.dimensions"),
    (_line("/v1/completions", {"prompt": ["a", "b"]}), ErrorCode.INVALID_FIELD, "single string"),
    (_line("/v1/completions", {"prompt": ""}), ErrorCode.EMPTY_INPUT, "body.prompt"),
    (_line("/v1/completions", {}), ErrorCode.MISSING_FIELD, "body.prompt"),
    (_line("/v1/completions", {"prompt": "x", "max_tokens": 0}), ErrorCode.MAX_TOKENS_OUT_OF_RANGE, "max_tokens"),
    (_line("/v1/completions", {"prompt": "x", "temperature": -1}), ErrorCode.INVALID_PARAMETER, "temperature"),
    (_line("/v1/completions", {"prompt": "x", "stop": [""]}), ErrorCode.INVALID_PARAMETER, "body.stop"),
    (_line("/v1/completions", {"prompt": "x", "n": 2}), ErrorCode.INVALID_PARAMETER, "body.n"),
    (_line("/v1/completions", {"prompt": "x", "frobnicate": 1}), ErrorCode.INVALID_PARAMETER, "frobnicate"),
    (_line("/v1/chat/completions", {"messages": []}), ErrorCode.EMPTY_INPUT, "messages"),
    (_line("/v1/chat/completions", {"messages": "hi"}), ErrorCode.INVALID_FIELD, "messages"),
    (_line("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}), ErrorCode.INVALID_FIELD,
     "messages.0.role"),
    (_line("/v1/chat/completions", {"messages": [{"role": "user"}]}), ErrorCode.MISSING_FIELD, "messages.0.content"),
    (_line("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}), ErrorCode.INVALID_FIELD,
     "user"),
    (_line("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
     ErrorCode.INVALID_FIELD, "image_url"),
    (_line("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                    "max_completion_tokens": 4}), ErrorCode.INVALID_PARAMETER, "disagree"),
    (_line("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": True}),
     ErrorCode.INVALID_PARAMETER, "max_tokens"),
    (_line("/v1/embeddings", {"input": "x"}, custom_id="c" * 600), ErrorCode.INVALID_FIELD, "custom_id"),
])
def test_bad_lines_raise_their_error_code(obj: Any, code: ErrorCode, needle: str) -> None:
    # Given a bad OpenAI batch line / When mapped
    error = _error(obj)
    # Then it raises a task error with the matching code and a message naming the problem
    assert error.code == code, error.message
    assert needle in error.message
    assert error.retryable is False


def _result(output: EmbedOutput | GenerateOutput | None, **overrides: Any) -> Result:
    fields = {"task_id": "t-1", "custom_id": "req-1", "batch_id": "b-1", "status": "ok", "output": output,
              "model": "gemma-3-270m", "created_at": WHEN}
    return Result(**{**fields, **overrides})


GEN = GenerateOutput(text="Paris.", finish_reason="stop", prompt_tokens=5, completion_tokens=2)


def test_embeddings_output_line() -> None:
    # Given an ok embed result of two texts
    result = _result(EmbedOutput(embeddings=[[0.5, 0.25], [1.0, 0.0]], dims=2, input_tokens=[3, 4],
                                 truncated=[False, False]), kind="embed")
    # When written as an embeddings output line
    line = openai_output_line(result, fmt="embeddings")
    # Then it has OpenAI's batch output and embeddings response shapes
    assert line == {"id": "batch_req_t-1", "custom_id": "req-1", "error": None, "response": {
        "status_code": 200, "request_id": "t-1", "body": {
            "object": "list", "model": "gemma-3-270m", "usage": {"prompt_tokens": 7, "total_tokens": 7},
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]},
                     {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}]}}}


def test_completions_output_line() -> None:
    # Given an ok generate result / When written as a completions output line
    body = openai_output_line(_result(GEN), fmt="completions")["response"]["body"]
    # Then it is a text_completion with one choice and usage
    assert body == {"id": "cmpl-t-1", "object": "text_completion", "created": int(WHEN.timestamp()),
                    "model": "gemma-3-270m",
                    "choices": [{"index": 0, "text": "Paris.", "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def test_chat_output_line() -> None:
    # Given an ok generate result that ran out of tokens / When written as a chat output line
    result = _result(GEN.model_copy(update={"finish_reason": "length"}))
    body = openai_output_line(result, fmt="chat.completions")["response"]["body"]
    # Then it is a chat.completion whose message is the assistant's
    assert body["id"] == "chatcmpl-t-1" and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                                "finish_reason": "length", "logprobs": None}]
    assert body["usage"]["total_tokens"] == 7 and body["created"] == int(WHEN.timestamp())


def test_native_output_line_carries_the_output() -> None:
    # Given an ok generate result / When written in the native format
    line = openai_output_line(_result(GEN), fmt="native")
    # Then the body is the result's output as JSON
    assert line["response"]["body"] == GEN.model_dump(mode="json")
    assert line["error"] is None


@pytest.mark.parametrize("fmt", ["embeddings", "completions", "chat.completions", "native"])
@pytest.mark.parametrize(("retryable", "status_code"), [(False, 400), (True, 500)])
def test_error_output_line(fmt: str, retryable: bool, status_code: int) -> None:
    # Given an error result, permanent or retryable
    error = ErrorInfo(code=ErrorCode.INPUT_TOO_LONG, message="too long", retryable=retryable)
    result = _result(None, status="error", error=error)
    # When written in any format
    line = openai_output_line(result, fmt=fmt)
    # Then both the response body and the line's error carry the code and message
    detail = {"code": "input_too_long", "message": "too long"}
    assert line == {"id": "batch_req_t-1", "custom_id": "req-1", "error": detail,
                    "response": {"status_code": status_code, "request_id": "t-1", "body": {"error": detail}}}


def test_output_that_does_not_fit_the_format_becomes_an_error_line() -> None:
    # Given an ok generate result recorded for an embeddings line / When written
    line = openai_output_line(_result(GEN), fmt="embeddings")
    # Then it is an internal error line rather than a malformed body
    assert line["error"]["code"] == "internal"
    assert line["response"]["status_code"] == 400


def test_unknown_format_is_a_programming_error() -> None:
    # Given a format tag nobody defined / When written / Then it raises ValueError
    with pytest.raises(ValueError, match="unknown format"):
        openai_output_line(_result(GEN), fmt="responses")
