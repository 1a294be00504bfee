"""An API request's sampling fields turned into llmos's request options, validated once, by options.py.

The APIs name things their own way (OpenAI's `max_completion_tokens`, Ollama's `num_predict`); each
handler renames its fields to llmos's option names, and this file types the JSON values as the D-Bus
values they would be and hands them to `parse_options`, the same validation a D-Bus caller's a{sv} gets.
So there is one list of options and one set of limits, whatever the protocol.
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant

from system_services.http.wire import HttpError
from system_services.options import KNOWN, RequestOptions, parse_options


def _signature(value: Any) -> str | None:
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int):
        return "x" if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return "d"
    if isinstance(value, str):
        return "s"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "as"
    return None


def to_options(
    daemon: Any,
    values: dict[str, Any],
    names: dict[str, str] | None = None,
    allowed: frozenset[str] | None = None,
) -> RequestOptions:
    """`values`: llmos option name -> JSON value (None = not given). `names`: the API's field name for an
    option, for error messages."""
    raw: dict[str, Variant] = {}
    for key, value in values.items():
        if value is None:
            continue
        sigs, what = KNOWN[key]
        sig = _signature(value)
        if sig not in sigs:
            raise HttpError(400, f"{(names or {}).get(key, key)} must be {what}", "invalid_type")
        raw[key] = Variant(sig, value)
    limits = daemon.config.limits
    return parse_options(
        raw, default_max_tokens=limits.default_max_tokens, max_tokens_limit=limits.max_tokens, allowed=allowed
    )


def check_fields(body: dict[str, Any], known: dict[str, tuple[type, ...]], what: str) -> None:
    """Every field is one this endpoint knows, of a JSON type it can take (None: not given)."""
    for key, value in body.items():
        if key not in known:
            raise HttpError(400, f"{what} does not take the field {key[:64]!r}", "unknown_field")
        types = known[key]
        if value is not None and not (
            isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        ):
            names = "/".join(_JSON_NAMES[t] for t in types)
            raise HttpError(400, f"field {key!r} must be of type {names}", "invalid_type")


_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
