"""Options of a request (the a{sv} argument): known keys, right types, sane values, or InvalidArgument."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbus_fast import Variant

from agents.structured_output import InvalidSchemaError, parse_schema
from llmos.engine.sampling import SamplingParams
from llmos.errors import InvalidSamplingError
from system_services.dbus_errors import error
from system_services.history import checked_history

_INT = frozenset("ynqiuxt")
# option -> (allowed D-Bus signatures, what it is)
KNOWN: dict[str, tuple[frozenset[str], str]] = {
    "max_tokens": (_INT, "an integer"),
    "temperature": (frozenset("d") | _INT, "a number"),
    "top_k": (_INT, "an integer"),
    "top_p": (frozenset("d") | _INT, "a number"),
    "repetition_penalty": (frozenset("d") | _INT, "a number"),
    "seed": (_INT, "an integer"),
    "stop": (frozenset({"as"}), "an array of strings"),
    "ignore_eos": (frozenset("b"), "a boolean"),  # keep going past end-of-sequence: benchmarks, tests
    "speculative": (frozenset("b"), "a boolean"),  # false: no n-gram drafts (the output is the same)
    "system_prompt": (frozenset("s"), "a string"),
    "handle_token": (frozenset("s"), "a string"),
    "priority": (frozenset("s"), "a string"),
    "json_schema": (frozenset("s"), "a string (a JSON Schema)"),
    "messages": (frozenset({"aa{ss}"}), "an array of {role, content} dictionaries (aa{ss})"),
}
PRIORITIES = ("interactive", "normal", "background")
SAMPLING = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "speculative",
)


@dataclass(frozen=True)
class RequestOptions:
    params: SamplingParams
    system_prompt: str | None
    handle_token: str | None
    priority: str
    json_schema: str | None = None  # the answer must be JSON valid against it (constrained decoding)
    grammar: str | None = None  # or match this llguidance grammar (set by the daemon, never by callers)
    messages: list[dict[str, str]] | None = None  # history of every role (CreateSession; history.py)


def parse_options(
    raw: dict[str, Any],
    *,
    default_max_tokens: int,
    max_tokens_limit: int,
    allowed: frozenset[str] | None = None,
) -> RequestOptions:
    values: dict[str, Any] = {}
    for key, var in raw.items():
        if key not in KNOWN or (allowed is not None and key not in allowed):
            accepted = ", ".join(sorted(allowed if allowed is not None else KNOWN))
            raise error("InvalidArgument", f"unknown option {key!r} (accepted here: {accepted})")
        sigs, what = KNOWN[key]
        sig = var.signature if isinstance(var, Variant) else None
        if sig not in sigs:
            raise error("InvalidArgument", f"option {key!r} must be {what}, not of D-Bus type {sig!r}")
        values[key] = var.value
    if "handle_token" in values and not _token_ok(values["handle_token"]):
        raise error("InvalidArgument", "handle_token must be 1-64 characters of A-Z, a-z, 0-9 and _")
    priority = values.get("priority", "normal")
    if priority not in PRIORITIES:
        raise error("InvalidArgument", f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    sampling = {k: values[k] for k in SAMPLING if k in values}
    sampling.setdefault("max_tokens", default_max_tokens)
    if isinstance(sampling["max_tokens"], int) and sampling["max_tokens"] > max_tokens_limit:
        raise error(
            "InvalidArgument",
            f"max_tokens {sampling['max_tokens']} is over this daemon's limit of {max_tokens_limit}",
        )
    try:
        params = SamplingParams.of(**sampling)
    except InvalidSamplingError as e:
        raise error("InvalidArgument", str(e)) from None
    schema = values.get("json_schema")
    if schema is not None:  # compiled later, on the model's own tokenizer: here, only parsed (bounded)
        try:
            parse_schema(schema)
        except InvalidSchemaError as e:
            raise error("InvalidArgument", str(e)) from None
    messages = checked_history(values["messages"]) if "messages" in values else None
    return RequestOptions(
        params, values.get("system_prompt"), values.get("handle_token"), priority, schema, messages=messages
    )


def _token_ok(token: str) -> bool:
    return 0 < len(token) <= 64 and all(c.isascii() and (c.isalnum() or c == "_") for c in token)
