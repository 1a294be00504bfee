"""Arguments grounded in the request: the schema one call is generated against, narrowed to what the
request says, and the values the model wrote tied back to the request's own words.

- A time or date parameter (`format` time/date, a time `pattern`, "HH:MM" / "YYYY-MM-DD" in its
  description, or named `time`) gets the time or date the request states, read deterministically
  (agents/request_values.py) and fixed in the grammar (`const`): the model cannot write another.
- An enum parameter whose values the request names exactly one of takes that one.
- A boolean that switches something on or off takes the polarity the request's words give ("switch
  it off", "enable").
- A number parameter, when the request states numbers, may only take one of them (or a hundredth of
  one: "4%" as a rate of 0.04).
- Optional parameters the request does not mention (by name, description words or enum value) are
  left out of the call: a small model fills every slot it is shown with something.
- A free-text string (no enum, pattern or format) is one of the request's own runs of words (a
  `pattern` of them): a small model asked for a city otherwise writes one it made up.
- A string the model wrote that is the request's words in other case, or nearly its words, is replaced
  by them; a title-like string that is not in the request becomes the request's quoted span if it has
  exactly one ("a title stated in the request came back as the tool's own name", issue 12).
"""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any

from agents import request_values as rv
from agents.tool_retrieval import terms
from agents.tools import Tool

_TIME_PATTERN = re.compile(r"\[0-[12]\]|\\d\{2\}:|\\d:|:\[0-5\]|\\d\{1,2\}:")


def _kind(name: str, prop: dict[str, Any]) -> str | None:
    """ "time", "date" or None: what a string parameter holds, by its format, pattern or description."""
    if prop.get("type") not in ("string", None):
        return None
    desc = str(prop.get("description", ""))
    if prop.get("format") == "time" or _TIME_PATTERN.search(str(prop.get("pattern", ""))):
        return "time"
    if re.search(r"\bhh:mm\b|\b\d{1,2}:\d{2}\b", desc, re.I) or name.lower() in ("time", "start_time"):
        return "time"
    if prop.get("format") == "date" or re.search(r"yyyy-mm-dd|\d{4}-\d{2}-\d{2}", desc, re.I):
        return "date"
    return None


def _flat(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _named_values(prop: dict[str, Any], request: str) -> list[Any]:
    """The enum values the request names ("wi-fi" names `wifi`, "do not disturb" `do_not_disturb`)."""
    flat = _flat(request)
    return [v for v in prop.get("enum", []) if isinstance(v, str) and len(_flat(v)) >= 2 and _flat(v) in flat]


def _is_switch(name: str, prop: dict[str, Any]) -> bool:
    """A boolean that says whether something is on: named so, or described as switching on/off."""
    desc = str(prop.get("description", "")).lower()
    return name.lower() in ("on", "enabled", "enable", "active", "state", "power") or (
        " on" in f" {desc}" and "off" in desc
    )


def _mentioned(name: str, prop: dict[str, Any], request: str, request_terms: set[str]) -> bool:
    if (
        any(r.startswith(t) for t in terms(name) if len(t) >= 4 for r in request_terms)
        or set(terms(name)) & request_terms
    ):
        return True  # "labelled" names `label`
    if re.search(r"title|name|label|subject", name) and rv.quoted(request):
        return True  # a quoted span is something the request wants written somewhere
    low = request.lower()
    return any(isinstance(v, str) and v.lower().replace("_", " ") in low for v in prop.get("enum", []))


def call_schema(tool: Tool, request: str, strict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the strict parameters narrowed for this request, the values fixed in them by name)."""
    schema = copy.deepcopy(strict)
    props: dict[str, Any] = schema.get("properties") or {}
    own = tool.spec.parameters.get("properties") or {}
    required = set(schema.get("required") or [])
    request_terms = set(terms(request))
    times, dates = rv.clock_times(request), rv.iso_dates(request)
    stated = rv.numbers(request)
    spans = request_spans(request)
    fixed: dict[str, Any] = {}
    for name in list(props):
        prop, author = props[name], own.get(name) if isinstance(own.get(name), dict) else {}
        kind = _kind(name, author)
        pool = times if kind == "time" else dates if kind == "date" else None
        if pool:
            fixed[name] = pool.pop(0)
            props[name] = {"const": fixed[name]}
            continue
        named = _named_values(author, request)
        if len(named) == 1 and name in required:
            fixed[name] = named[0]  # the one allowed value the request names
            props[name] = {"const": named[0]}
            continue
        if (
            prop.get("type") == "boolean"
            and _is_switch(name, author)
            and (on := rv.switched(request)) is not None
        ):
            fixed[name] = on  # "switch it off": the polarity is in the words, not for the model to guess
            props[name] = {"const": on}
            continue
        if name not in required and (kind or not _mentioned(name, author, request, request_terms)):
            del props[name]  # optional, and the request says nothing of it
            continue
        if (
            isinstance(prop, dict)
            and prop.get("type") in ("integer", "number")
            and stated
            and "enum" not in prop
        ):
            values = stated + [round(v / 100, 6) for v in stated]
            if prop["type"] == "integer":
                values = [int(v) for v in values if float(v).is_integer()]
            values = [v for v in dict.fromkeys(values) if _within(prop, v)]
            if values:
                props[name] = {"type": prop["type"], "enum": values}
        elif isinstance(prop, dict) and _free_text(author) and spans:
            props[name] = {**prop, "pattern": spans}  # the request's own words, copied
            if name not in required and re.search(r"title|name|label|subject", name) and rv.quoted(request):
                schema.setdefault("required", []).append(name)  # the quoted title it was kept for
        elif isinstance(prop, dict) and prop.get("type") == "array" and spans:
            items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
            own_items = author.get("items") if isinstance(author.get("items"), dict) else {}
            if items.get("type") == "string" and _free_text(own_items):
                props[name] = {**prop, "items": {**items, "pattern": spans}}
    schema["required"] = [n for n in schema.get("required") or [] if n in props]
    return schema, fixed


MAX_SPAN_WORDS = 8
_META = re.compile(r"([\\.+*?()|\[\]{}^$#&\-~])")
_EDGE = "\"'“”‘’.,!?:;()"


def request_spans(request: str) -> str | None:
    """A pattern matching exactly the runs of up to MAX_SPAN_WORDS consecutive words of the request
    (quotes and end punctuation trimmed): what a free-text value stated in the request can be."""
    words = request.split()
    spans: dict[str, None] = {}
    for i in range(len(words)):
        for j in range(i + 1, min(len(words), i + MAX_SPAN_WORDS) + 1):
            span = " ".join(words[i:j]).strip(_EDGE)
            if span:
                spans[span] = None
    if not spans or len(spans) > 400:
        return None
    return "^(" + "|".join(_META.sub(r"\\\1", s) for s in sorted(spans, key=len, reverse=True)) + ")$"


def _free_text(prop: dict[str, Any]) -> bool:
    """A string with nothing that says what it must look like: no enum, const, pattern or format."""
    return prop.get("type") == "string" and not any(k in prop for k in ("enum", "const", "pattern", "format"))


def _within(prop: dict[str, Any], v: float) -> bool:
    low, high = prop.get("minimum"), prop.get("maximum")
    return (low is None or v >= low) and (high is None or v <= high)


def tie_to_request(tool: Tool, arguments: dict[str, Any], request: str) -> dict[str, Any]:
    """The call's string values in the request's own words, where the model wrote them nearly so."""
    own = tool.spec.parameters.get("properties") or {}
    out = dict(arguments)
    quotes = rv.quoted(request)
    for name, value in arguments.items():
        prop = own.get(name) if isinstance(own.get(name), dict) else {}
        if not isinstance(value, str) or prop.get("enum") or _kind(name, prop) or prop.get("pattern"):
            continue
        if len(quotes) == 1 and value not in quotes[0] and re.search(r"title|name|label|subject", name):
            out[name] = quotes[0]
            continue
        out[name] = nearest_span(value, request)
    return out


def nearest_span(value: str, request: str) -> str:
    """`value`, or the words of `request` it nearly is (case, a missing letter): at least 0.85 alike."""
    v = value.strip()
    if not v or v in request:
        return value
    words = re.findall(r"\S+", request)
    best, best_ratio = value, 0.0
    n = len(v.split())
    for size in {max(1, n - 1), n, n + 1}:
        for i in range(len(words) - size + 1):
            span = " ".join(words[i : i + size]).strip(".,!?;:'\"“”‘’")
            ratio = difflib.SequenceMatcher(None, v.lower(), span.lower()).ratio()
            if ratio > best_ratio:
                best, best_ratio = span, ratio
    return best if best_ratio >= 0.85 else value
