"""JSON from outside the daemon, parsed only within bounds: a size and a nesting depth, both checked
before the parser runs.

`json.loads` recurses (in C) once per nested array or object and raises RecursionError near a thousand
levels; what a parsed value goes to next (pydantic, llguidance's schema compiler, json.dumps) recurses
again, in native code too. So a caller's `[[[[…` would be a RecursionError (an "internal error" with a
traceback in the log) or, a little less deep, a native stack at risk. Here the depth is measured on the
text without recursion (strings taken out, then the brackets counted), so JSON nested too deep is
refused by name and never reaches a parser. No real schema, manifest or tool result comes near
MAX_DEPTH levels.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from llmos.errors import LlmosError

MAX_DEPTH = 64  # arrays and objects inside each other

# A JSON string: a quote, then anything in which a backslash takes the next character along, up to the
# first unescaped quote (exactly where the parser ends it, so brackets inside strings are not counted).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class InvalidJsonError(LlmosError, ValueError):
    """Text that is not JSON."""

    dbus_name = "InvalidArgument"


class JsonLimitError(InvalidJsonError):
    """JSON over its size or nesting limit, refused before it was parsed."""


def text_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text (0 for a scalar), counted without recursion. For
    text that is not JSON the count may be off, but never below the depth a parser would reach before
    it found the mistake."""
    if text.count("[") + text.count("{") == 0:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def value_depth(value: Any) -> int:
    """How deep lists and dicts nest in a parsed value (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, level = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list | tuple):
            deepest = max(deepest, level)
            stack.extend((x, level + 1) for x in v)
    return deepest


def loads(text: str, what: str, *, max_chars: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads(text)`, if `text` is at most `max_chars` characters and nests at most `max_depth`
    levels: JsonLimitError otherwise, InvalidJsonError if it is not JSON. `what` names the text in the
    message ("json_schema", "the manifest", ...)."""
    if max_chars is not None and len(text) > max_chars:
        raise JsonLimitError(f"{what} is over {max_chars} characters")
    if text.count("[") + text.count("{") > max_depth and text_depth(text) > max_depth:
        raise JsonLimitError(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidJsonError(f"{what} is not JSON: {e}") from None
