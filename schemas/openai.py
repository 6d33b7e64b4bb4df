"""The OpenAI batch contract: request lines into envelopes, results into OpenAI-style output lines.

Pure functions over our schemas, so the CLI's batch files and any OpenAI-shaped door share one mapping.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ValidationError

from schemas.codec import classify_validation_error
from schemas.envelope import CodeTask, EmbedTask, GenerateTask, GraphTask
from schemas.errors import ErrorCode, ErrorInfo, TaskError
from schemas.result import EmbedOutput, GenerateOutput, Result, ResultStatus

Format = Literal["native", "embeddings", "completions", "chat.completions"]
NATIVE = "native"
URL_FORMATS: dict[str, str] = {
    "/v1/embeddings": "embeddings",
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat.completions",
}
FORMATS: frozenset[str] = frozenset({NATIVE, *URL_FORMATS.values()})
LINE_FIELDS = ("custom_id", "method", "url", "body")

# Accepted and ignored: the worker serves one model, and these only label or store the request at OpenAI.
_IGNORED = frozenset({"model", "user", "metadata", "store"})
# OpenAI parameters this service cannot honour: accepted only at the value that changes nothing.
_COMMON_NOOP: dict[str, tuple[Any, ...]] = {
    "n": (1,), "stream": (False,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
}
_COMPLETION_NOOP = {**_COMMON_NOOP, "echo": (False,), "best_of": (1,), "logprobs": (0,), "suffix": ("",)}
_CHAT_NOOP = {**_COMMON_NOOP, "logprobs": (False,), "top_logprobs": (0,), "response_format": ({"type": "text"},),
              "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False)}
_SAMPLING = ("max_tokens", "temperature", "top_p", "stop", "seed")
_CHAT_ROLES = ("system", "developer", "user", "assistant")
_NUMERIC = frozenset({"max_tokens", "max_completion_tokens", "dimensions", "seed", "temperature", "top_p"})

AnyTask = EmbedTask | GenerateTask | GraphTask | CodeTask


def envelope_from_openai_line(obj: Any, *, batch_id: str | None, task_id: str) -> tuple[AnyTask, str]:
    """One OpenAI batch line `{custom_id, method, url, body}` as an envelope and its format tag.

    Differences from OpenAI: an absent `temperature` means 0 (greedy, reproducible) rather than 1,
    an absent `max_tokens` means GeneratePayload's default (128), and `body.model` is ignored.
    """
    if not isinstance(obj, dict):
        raise TaskError(ErrorCode.NOT_AN_OBJECT, f"an OpenAI batch line must be a JSON object, got {type(obj).__name__}")
    _check_line_fields(obj)
    url, body = obj["url"], obj["body"]
    fmt = URL_FORMATS[url]
    if fmt == "embeddings":
        task_cls, payload, renames = EmbedTask, _embed_payload(body), {"texts": "input", "dims": "dimensions"}
    elif fmt == "completions":
        task_cls, payload, renames = GenerateTask, _completion_payload(body), {}
    else:
        task_cls, payload, renames = GenerateTask, _chat_payload(body), {"prompt": "messages"}
    fields = {"task_id": task_id, "batch_id": batch_id, "custom_id": obj["custom_id"], "payload": payload}
    try:
        return task_cls.model_validate(fields), fmt
    except ValidationError as exc:
        code, message = classify_validation_error(exc)
        for ours, theirs in renames.items():
            message = message.replace(f"payload.{ours}", f"payload.{theirs}")
        raise TaskError(code, message.replace("payload.", "body.")) from None


def _check_line_fields(obj: dict[str, Any]) -> None:
    """The line's own fields, before its body: all four present, no others, POST to a known url."""
    for name in LINE_FIELDS:
        if obj.get(name) is None:
            raise TaskError(ErrorCode.MISSING_FIELD, f"required field {name!r} is missing; an OpenAI batch line "
                                                     f"has {', '.join(LINE_FIELDS)}")
    if extra := sorted(set(obj) - set(LINE_FIELDS)):
        raise TaskError(ErrorCode.INVALID_FIELD, f"unknown field(s) {', '.join(map(repr, extra))} in an OpenAI batch "
                                                 f"line; it has only {', '.join(LINE_FIELDS)}")
    if not isinstance(obj["custom_id"], str) or not obj["custom_id"]:
        raise TaskError(ErrorCode.INVALID_FIELD, f"custom_id must be a non-empty string, got {obj['custom_id']!r}")
    if obj["method"] != "POST":
        raise TaskError(ErrorCode.INVALID_FIELD, f"method {obj['method']!r} is not supported; use 'POST'")
    if obj["url"] not in URL_FORMATS:
        raise TaskError(ErrorCode.INVALID_FIELD, f"url {obj['url']!r} is not supported; use one of "
                                                 f"{', '.join(URL_FORMATS)}")
    if not isinstance(obj["body"], dict):
        raise TaskError(ErrorCode.INVALID_FIELD, f"body must be a JSON object, got {type(obj['body']).__name__}")


def _check_params(body: Mapping[str, Any], *, allowed: tuple[str, ...], noop: Mapping[str, tuple[Any, ...]],
                  url: str) -> None:
    """Refuse parameters that would silently be ignored: a caller asking for n=2 must hear no."""
    for key, value in body.items():
        if value is None or key in _IGNORED or key in allowed:
            if isinstance(value, bool) and key in _NUMERIC:  # pydantic would read true as 1
                raise TaskError(ErrorCode.INVALID_PARAMETER, f"body.{key} must be a number, got {value!r}")
            continue
        if key in noop:
            if value in noop[key]:
                continue
            raise TaskError(ErrorCode.INVALID_PARAMETER, (
                f"body.{key}={value!r} is not supported by this service; omit it or use {noop[key][0]!r}"))
        supported = ", ".join(sorted({*allowed, *noop}))
        raise TaskError(ErrorCode.INVALID_PARAMETER, f"body.{key} is not a supported parameter for {url}; "
                                                     f"supported: {supported}")


def _embed_payload(body: Mapping[str, Any]) -> dict[str, Any]:
    _check_params(body, allowed=("input", "dimensions", "encoding_format"), noop={}, url="/v1/embeddings")
    raw = body.get("input")
    if raw is None:
        raise TaskError(ErrorCode.MISSING_FIELD, "required field 'body.input' is missing: a string or a list of strings")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        if isinstance(texts, list) and any(isinstance(t, (int, list)) for t in texts):
            raise TaskError(ErrorCode.INVALID_FIELD, "body.input holds token ids; this service takes text only, "
                                                     "send a string or a list of strings")
        raise TaskError(ErrorCode.INVALID_FIELD, f"body.input must be a string or a list of strings, "
                                                 f"got {type(raw).__name__}")
    if body.get("encoding_format", "float") not in (None, "float"):
        raise TaskError(ErrorCode.INVALID_PARAMETER, (
            f"body.encoding_format={body['encoding_format']!r} is not supported; use 'float' (or omit it)"))
    payload: dict[str, Any] = {"texts": texts}
    if body.get("dimensions") is not None:
        payload["dims"] = body["dimensions"]
    return payload


def _completion_payload(body: Mapping[str, Any]) -> dict[str, Any]:
    _check_params(body, allowed=("prompt", *_SAMPLING), noop=_COMPLETION_NOOP, url="/v1/completions")
    prompt = body.get("prompt")
    if prompt is None:
        raise TaskError(ErrorCode.MISSING_FIELD, "required field 'body.prompt' is missing")
    if isinstance(prompt, list):
        raise TaskError(ErrorCode.INVALID_FIELD, "body.prompt must be a single string, not a list; put each prompt "
                                                 "on its own batch line with its own custom_id")
    if not isinstance(prompt, str):
        raise TaskError(ErrorCode.INVALID_FIELD, f"body.prompt must be a string, got {type(prompt).__name__}")
    return {"prompt": prompt, **_sampling(body, max_tokens=body.get("max_tokens"))}


def _chat_payload(body: Mapping[str, Any]) -> dict[str, Any]:
    _check_params(body, allowed=("messages", "max_completion_tokens", *_SAMPLING), noop=_CHAT_NOOP,
                  url="/v1/chat/completions")
    if body.get("messages") is None:
        raise TaskError(ErrorCode.MISSING_FIELD, "required field 'body.messages' is missing")
    max_tokens, max_completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise TaskError(ErrorCode.INVALID_PARAMETER, (
            f"body.max_tokens={max_tokens!r} and body.max_completion_tokens={max_completion!r} disagree; send one"))
    prompt = render_gemma_chat(body["messages"])
    return {"prompt": prompt, **_sampling(body, max_tokens=max_completion if max_completion is not None else max_tokens)}


def _sampling(body: Mapping[str, Any], *, max_tokens: Any) -> dict[str, Any]:
    """The generation parameters present in body; absent ones keep GeneratePayload's defaults."""
    params = {k: body[k] for k in ("temperature", "top_p", "seed") if body.get(k) is not None}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise TaskError(ErrorCode.INVALID_PARAMETER, f"body.stop must be a non-empty string or a list of "
                                                         f"non-empty strings, got {stop!r}")
        params["stop"] = stops
    return params


def render_gemma_chat(messages: Any) -> str:
    """Chat messages as one Gemma prompt, ending where the model's turn begins. No `<bos>`: the tokenizer adds it.

    System and developer messages are prepended to the first user turn (Gemma has no system role);
    consecutive messages of one role are merged, since Gemma expects user and model turns to alternate.
    """
    if not isinstance(messages, list):
        raise TaskError(ErrorCode.INVALID_FIELD, f"messages must be a list of {{role, content}} objects, "
                                                 f"got {type(messages).__name__}")
    if not messages:
        raise TaskError(ErrorCode.EMPTY_INPUT, "messages must not be empty")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    for index, message in enumerate(messages):
        role, text = _message_text(message, index=index)
        if role in ("system", "developer"):
            system.append(text)
            continue
        turn_role = "model" if role == "assistant" else "user"
        if turns and turns[-1][0] == turn_role:
            turns[-1][1].append(text)
        else:
            turns.append((turn_role, [text]))
    first_user = next((turn for turn in turns if turn[0] == "user"), None)
    if first_user is None:
        raise TaskError(ErrorCode.INVALID_FIELD, "messages must include at least one message with role 'user'")
    first_user[1][:0] = system
    if not any(text for _, texts in turns for text in texts):
        raise TaskError(ErrorCode.EMPTY_INPUT, "messages hold no text")
    rendered = [f"<start_of_turn>{role}\n" + "\n\n".join(t for t in texts if t) + "<end_of_turn>\n"
                for role, texts in turns]
    return "".join(rendered) + "<start_of_turn>model\n"


def _message_text(message: Any, *, index: int) -> tuple[str, str]:
    """One message's role and text; text parts are trimmed (as Gemma's template does) and joined by newlines."""
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise TaskError(ErrorCode.INVALID_FIELD, f"{where} must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role is None:
        raise TaskError(ErrorCode.MISSING_FIELD, f"required field '{where}.role' is missing")
    if role not in _CHAT_ROLES:
        raise TaskError(ErrorCode.INVALID_FIELD, f"{where}.role {role!r} is not supported; use one of "
                                                 f"{', '.join(_CHAT_ROLES)} (tool calls are not supported)")
    if message.get("tool_calls") or message.get("function_call"):
        raise TaskError(ErrorCode.INVALID_FIELD, f"{where} carries tool calls, which this service does not support")
    if content is None:
        raise TaskError(ErrorCode.MISSING_FIELD, f"required field '{where}.content' is missing")
    if isinstance(content, str):
        return role, content.strip()
    if not isinstance(content, list):
        raise TaskError(ErrorCode.INVALID_FIELD, f"{where}.content must be a string or a list of text parts")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise TaskError(ErrorCode.INVALID_FIELD, f"{where}.content.{j}: only {{'type': 'text', 'text': ...}} "
                                                     f"parts are supported, got {kind!r}")
        parts.append(part["text"].strip())
    return role, "\n".join(p for p in parts if p)


def openai_output_line(result: Result, *, fmt: str) -> dict[str, Any]:
    """One OpenAI batch output line `{id, custom_id, response, error}` for a result of the given format tag."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(sorted(FORMATS))}")
    line = {"id": f"batch_req_{result.task_id}", "custom_id": result.custom_id}
    error = result.error
    if result.status == ResultStatus.OK:
        body = _ok_body(result, fmt)
        if body is not _MISMATCH:
            response = {"status_code": 200, "request_id": result.task_id, "body": body}
            return {**line, "response": response, "error": None}
        error = ErrorInfo(code=ErrorCode.INTERNAL, message=(
            f"result {result.task_id} is ok but its output does not fit format {fmt!r}; resubmit the task"))
    if error is None:
        error = ErrorInfo(code=ErrorCode.INTERNAL, message=f"result {result.task_id} failed without an error detail")
    detail = {"code": error.code.value, "message": error.message}
    response = {"status_code": 500 if error.retryable else 400, "request_id": result.task_id,
                "body": {"error": detail}}
    return {**line, "response": response, "error": dict(detail)}


_MISMATCH = object()


def _ok_body(result: Result, fmt: str) -> Any:
    """The response body of an ok result, or _MISMATCH when its output is not what the format needs."""
    output = result.output
    if fmt == NATIVE:
        return output.model_dump(mode="json") if output is not None else None
    if fmt == "embeddings":
        if not isinstance(output, EmbedOutput):
            return _MISMATCH
        tokens = sum(output.input_tokens)
        data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(output.embeddings)]
        return {"object": "list", "data": data, "model": result.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if not isinstance(output, GenerateOutput):
        return _MISMATCH
    usage = {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
             "total_tokens": output.prompt_tokens + output.completion_tokens}
    created = int(result.created_at.timestamp())
    if fmt == "completions":
        choice = {"index": 0, "text": output.text, "finish_reason": output.finish_reason, "logprobs": None}
        return {"id": f"cmpl-{result.task_id}", "object": "text_completion", "created": created,
                "model": result.model, "choices": [choice], "usage": usage}
    choice = {"index": 0, "message": {"role": "assistant", "content": output.text},
              "finish_reason": output.finish_reason, "logprobs": None}
    return {"id": f"chatcmpl-{result.task_id}", "object": "chat.completion", "created": created,
            "model": result.model, "choices": [choice], "usage": usage}
