"""Ollama's generation endpoints: POST /api/chat and POST /api/generate, NDJSON streams by default.

The same path as the OpenAI endpoints (`Daemon.job`, `generation.run`, the shared message, tool and
option code); only the shapes differ. Ollama's `options` are renamed to llmos's (num_predict ->
max_tokens, repeat_penalty -> repetition_penalty) and validated by options.py.

Two options never touch the one shared model: `keep_alive` is accepted and ignored (residency is the
arbiter's: idle unload after `[arbiter] idle_unload_s`, so one client cannot unload the model under
another, nor pin it), and `options.num_ctx` is a per-request limit, never a resize or a reload: a prompt
that does not fit it (with one token to spare) is a 400 naming both lengths, and the answer is capped
to what is left of it. Ollama would cut such a prompt silently.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from system_services.history import checked_history
from system_services.http import chat_messages, generation, tool_calls
from system_services.http.exchange import Exchange
from system_services.http.ollama_info import model_named, now
from system_services.http.request_options import check_fields, to_options
from system_services.http.wire import HttpError

COMMON = {
    "model": (str,),
    "stream": (bool,),
    "format": (str, dict),
    "options": (dict,),
    "keep_alive": (str, int, float),
}
CHAT_FIELDS = {**COMMON, "messages": (list,), "tools": (list,), "think": (bool, str)}
GENERATE_FIELDS = {
    **COMMON,
    "prompt": (str,),
    "system": (str,),
    "raw": (bool,),
    "suffix": (str,),
    "images": (list,),
    "think": (bool, str),
    "context": (list,),
    "template": (str,),
}
# Ollama option -> llmos option; the others Ollama has are refused by name (they would be ignored)
OPTIONS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
}
ACCEPTED = {"num_ctx", "num_thread", "num_gpu", "num_batch", "use_mmap", "repeat_last_n"}  # no effect here


def _options(ex: Exchange, body: dict[str, Any]) -> tuple[Any, int | None]:
    opts = body.get("options") or {}
    if unknown := sorted(set(opts) - set(OPTIONS) - ACCEPTED):
        raise HttpError(400, f"options.{unknown[0][:64]} is not supported")
    values = {OPTIONS[k]: v for k, v in opts.items() if k in OPTIONS}
    if isinstance(values.get("max_tokens"), int) and values["max_tokens"] < 0:  # -1: "until done"
        values["max_tokens"] = ex.daemon.config.limits.max_tokens
    num_ctx = opts.get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 2):
        raise HttpError(400, "options.num_ctx must be an integer of at least 2")
    fmt = body.get("format")
    schema = None if not fmt else json.dumps({"type": "object"} if fmt == "json" else fmt)
    if isinstance(fmt, str) and fmt not in ("", "json"):
        raise HttpError(400, 'format is "json" or a JSON Schema object')
    names = {v: f"options.{k}" for k, v in OPTIONS.items()}
    return to_options(ex.daemon, {**values, "json_schema": schema}, names), num_ctx


async def _within(ex: Exchange, prompt: Any, opts: Any, num_ctx: int | None) -> tuple[Any, list[int] | None]:
    """num_ctx as a per-request limit: the prompt fits it or is refused; the answer is capped to it."""
    if num_ctx is None or num_ctx >= ex.daemon.model.context_length:
        return opts, None
    ids = await ex.daemon.worker.tokenizing.run(lambda: ex.daemon.encode_prompt(prompt))
    if len(ids) + 1 > num_ctx:
        raise HttpError(
            400,
            f"the prompt needs {len(ids) + 1} tokens (with one generated) but options.num_ctx is {num_ctx}",
            "context_length_exceeded",
        )
    params = opts.params.model_copy(update={"max_tokens": min(opts.params.max_tokens, num_ctx - len(ids))})
    return replace(opts, params=params), ids


def _final(ex: Exchange, result: Any, started: float) -> dict[str, Any]:
    u = result.usage
    return {
        "done": True,
        "done_reason": "stop" if result.finish_reason.value == "stop" else "length",
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": int(u.prefill_s * 1e9),
        "eval_count": u.completion_tokens,
        "eval_duration": int(u.decode_s * 1e9),
    }


async def _answer(ex: Exchange, body: dict[str, Any], job: Any, key: str, plan: Any = None) -> None:
    """Run the job; stream (the default) or not; `key` is where text goes ("message" or "response")."""
    started, model = time.monotonic(), body["model"]

    def piece(text: str) -> dict[str, Any]:
        if key == "message":
            return {"model": model, "created_at": now(), "message": {"role": "assistant", "content": text}}
        return {"model": model, "created_at": now(), "response": text}

    stream = None
    if body.get("stream", True):
        stream = ex.start_stream(sse=False)

    async def emit(text: str) -> None:
        assert stream is not None
        await stream.event({**piece(text), "done": False})

    result = await generation.run(ex, job, emit if stream is not None and plan is None else None)
    last = piece("" if stream is not None and plan is None else result.text)
    if plan is not None:
        message, _ = plan.message(result.text, cut=result.finish_reason.value != "stop")
        calls = [
            {"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in message.get("tool_calls", [])
        ]
        last["message"] = {
            "role": "assistant",
            "content": message.get("content") or "",
            **({"tool_calls": calls} if calls else {}),
        }
    final = {**last, **_final(ex, result, started)}
    if stream is None:
        await ex.reply(final)
        return
    await stream.event(final)
    await stream.end()


async def chat(ex: Exchange) -> None:
    body = ex.json_body()
    check_fields(body, CHAT_FIELDS, "/api/chat")
    model_named(ex, body.get("model"))
    opts, num_ctx = _options(ex, body)
    fmt = ex.daemon.tool_format
    plan = tool_calls.plan(fmt, body.get("tools"), None, ex.caller, max(16, 8 * opts.params.max_tokens))
    messages = checked_history(chat_messages.to_messages(body.get("messages"), fmt))
    prompt: Any = messages
    if plan is not None:
        if opts.json_schema is not None:
            raise HttpError(400, "tools and format cannot be used together")
        prompt = plan.prompt(ex.daemon, plan.with_system(messages))
        opts = replace(opts, json_schema=plan.constraint.json_schema, grammar=plan.constraint.grammar)
    opts, ids = await _within(ex, prompt, opts, num_ctx)
    job = ex.daemon.job(prompt, opts, ex.caller.account)
    job.prompt_ids = ids
    await _answer(ex, body, job, "message", plan)


async def generate(ex: Exchange) -> None:
    body = ex.json_body()
    check_fields(body, GENERATE_FIELDS, "/api/generate")
    model_named(ex, body.get("model"))
    if body.get("images") or body.get("suffix") or body.get("template") or body.get("context"):
        raise HttpError(400, "images, suffix, template and context are not supported")
    opts, num_ctx = _options(ex, body)
    text = body.get("prompt") or ""
    if not text:  # Ollama's way to ask for the model to be loaded: it is (or will be on first use)
        await ex.reply(
            {"model": body["model"], "created_at": now(), "response": "", "done": True, "done_reason": "load"}
        )
        return
    system = body.get("system")
    prompt: Any = (
        text
        if body.get("raw")
        else [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": text}]
    )
    opts, ids = await _within(ex, prompt, opts, num_ctx)
    job = ex.daemon.job(prompt, opts, ex.caller.account)
    job.prompt_ids = ids
    await _answer(ex, body, job, "response")


ROUTES = {("POST", "/api/chat"): chat, ("POST", "/api/generate"): generate}
