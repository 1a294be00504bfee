"""OpenAI's API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Each request becomes one job through `Daemon.job` (the bounds, policy and class a D-Bus Generate gets)
and runs through `generation.run` (owned by the connection, cancelled when it leaves). Fields are
checked by name and JSON type first; sampling fields go to options.py by their llmos names. What differs
from OpenAI is in docs/http-api.md (greedy unless `temperature` is given, text-only content, n=1).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import replace
from typing import Any

from system_services.history import checked_history
from system_services.http import chat_messages, generation, tool_calls
from system_services.http.exchange import Exchange
from system_services.http.request_options import check_fields, to_options
from system_services.http.wire import HttpError

S, INT, N, B, L, D = (str,), (int,), (int, float), (bool,), (list,), (dict,)
SAMPLING = {
    "temperature": N,
    "top_p": N,
    "top_k": INT,
    "seed": INT,
    "stop": (str, list),
    "repetition_penalty": N,
    "ignore_eos": B,
}
# accepted and ignored (bookkeeping for OpenAI's service) or accepted only at their neutral value
IGNORED = {
    "user": S,
    "store": B,
    "metadata": D,
    "service_tier": S,
    "prompt_cache_key": S,
    "safety_identifier": S,
}
NEUTRAL = {"frequency_penalty": N, "presence_penalty": N, "logprobs": B, "top_logprobs": INT, "logit_bias": D}
COMMON = {
    "model": S,
    "stream": B,
    "stream_options": D,
    "max_tokens": INT,
    "n": INT,
    **SAMPLING,
    **IGNORED,
    **NEUTRAL,
}
CHAT_FIELDS = {
    **COMMON,
    "messages": L,
    "max_completion_tokens": INT,
    "response_format": D,
    "tools": L,
    "tool_choice": (str, dict),
    "parallel_tool_calls": B,
}
COMPLETION_FIELDS = {**COMMON, "prompt": (str, list), "echo": B, "suffix": S, "best_of": INT}
NAMES = {"max_tokens": "max_tokens (or max_completion_tokens)"}


def served_model(ex: Exchange) -> str:
    return ex.daemon.model.manifest.name


async def models(ex: Exchange) -> None:
    name = served_model(ex)
    await ex.reply(
        {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llmos"}]}
    )


def _common(ex: Exchange, body: dict[str, Any], fields: dict[str, tuple[type, ...]], what: str) -> None:
    if ex.daemon.state in ("loading", "stopping"):  # OpenAI clients retry a 503 after Retry-After
        raise HttpError(503, f"the model is {ex.daemon.state}", "model_loading", {"Retry-After": "2"})
    check_fields(body, fields, what)
    if body.get("model") not in (served_model(ex), f"{served_model(ex)}:latest"):
        raise HttpError(
            404,
            f"no model {str(body.get('model'))[:80]!r}; this daemon serves {served_model(ex)!r}",
            "model_not_found",
        )
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        raise HttpError(400, "only n=1 is supported (one choice per request)")
    for key in NEUTRAL:
        if body.get(key):
            raise HttpError(
                400, f"{key} is not supported (leave it out or at its default)", "unsupported_field"
            )
    if body.get("echo") or body.get("suffix"):
        raise HttpError(400, "echo and suffix are not supported", "unsupported_field")


def _options(ex: Exchange, body: dict[str, Any], json_schema: str | None = None) -> Any:
    stop = body.get("stop")
    values = {
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "seed": body.get("seed"),
        "repetition_penalty": body.get("repetition_penalty"),
        "ignore_eos": body.get("ignore_eos"),
        "stop": [stop] if isinstance(stop, str) else stop,
        "json_schema": json_schema,
    }
    return to_options(ex.daemon, values, NAMES)


def _schema(fmt: Any) -> str | None:
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return json.dumps({"type": "object"})
    spec = fmt.get("json_schema")
    if (
        fmt.get("type") != "json_schema"
        or not isinstance(spec, dict)
        or not isinstance(spec.get("schema"), dict)
    ):
        raise HttpError(
            400, "response_format is {type: text | json_object | json_schema, json_schema: {schema}}"
        )
    return json.dumps(spec["schema"])


def usage(result: Any) -> dict[str, Any]:
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.reused_tokens},
    }


def finish(result: Any) -> str:
    return "stop" if result.finish_reason.value == "stop" else "length"


async def chat(ex: Exchange) -> None:
    body = ex.json_body()
    _common(ex, body, CHAT_FIELDS, "/v1/chat/completions")
    fmt = ex.daemon.tool_format
    schema = _schema(body.get("response_format"))
    opts = _options(ex, body, schema)
    plan = tool_calls.plan(
        fmt, body.get("tools"), body.get("tool_choice"), ex.caller, max(16, 8 * opts.params.max_tokens)
    )
    if plan is not None and schema is not None:
        raise HttpError(400, "tools and response_format cannot be used together", "unsupported_field")
    messages = checked_history(chat_messages.to_messages(body.get("messages"), fmt))  # as CreateSession's
    prompt: Any = messages
    if plan is not None:
        prompt = plan.prompt(ex.daemon, plan.with_system(messages))
        opts = replace(opts, json_schema=plan.constraint.json_schema, grammar=plan.constraint.grammar)
    job = ex.daemon.job(prompt, opts, ex.caller.account)
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": served_model(ex)}
    if not body.get("stream"):
        result = await generation.run(ex, job)
        message, reason = _message(plan, result)
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        await ex.reply({**head, "object": "chat.completion", "choices": [choice], "usage": usage(result)})
        return
    stream = ex.start_stream(sse=True)
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    async def emit(text: str) -> None:
        if not stream.started:  # with the first text: an error before it keeps its own status
            await stream.event(chunk({"role": "assistant", "content": ""}))
        await stream.event(chunk({"content": text}))

    # with tools the answer is one JSON step or call: sent whole once it is parsed
    result = await generation.run(ex, job, emit if plan is None else None)
    message, reason = _message(plan, result)
    if not stream.started:
        await stream.event(chunk({"role": "assistant", "content": ""}))
    if plan is not None:
        delta = {k: v for k, v in message.items() if k != "role" and v is not None}
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
        await stream.event(chunk(delta))
    await stream.event(chunk({}, reason))
    if (body.get("stream_options") or {}).get("include_usage"):
        await stream.event({**head, "choices": [], "usage": usage(result)})
    await stream.end()


def _message(plan: tool_calls.ToolPlan | None, result: Any) -> tuple[dict[str, Any], str]:
    if plan is None:
        return {"role": "assistant", "content": result.text}, finish(result)
    return plan.message(result.text, cut=finish(result) == "length")


async def completions(ex: Exchange) -> None:
    body = ex.json_body()
    _common(ex, body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise HttpError(400, "prompt must be a non-empty string (one prompt per request)", "invalid_type")
    job = ex.daemon.job(prompt, _options(ex, body), ex.caller.account)
    head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time())}
    head["model"] = served_model(ex)

    def choice(text: str, reason: str | None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

    if not body.get("stream"):
        result = await generation.run(ex, job)
        await ex.reply({**choice(result.text, finish(result)), "usage": usage(result)})
        return
    stream = ex.start_stream(sse=True)

    async def emit(text: str) -> None:
        await stream.event(choice(text, None))

    result = await generation.run(ex, job, emit)
    await stream.event(choice("", finish(result)))
    if (body.get("stream_options") or {}).get("include_usage"):
        await stream.event({**head, "choices": [], "usage": usage(result)})
    await stream.end()


ROUTES = {
    ("GET", "/v1/models"): models,
    ("POST", "/v1/chat/completions"): chat,
    ("POST", "/v1/completions"): completions,
}
