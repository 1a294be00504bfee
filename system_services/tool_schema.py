"""A typed Python function as a tool: its manifest entry (name, description, JSON Schema of its
parameters) derived from its signature and docstring, as smolagents does.

    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict:
        \"\"\"Current weather for a city.

        Args:
            city: the city's name as the user said it, e.g. "Oslo"
            unit: c for Celsius, f for Fahrenheit
        \"\"\"

The summary (the docstring up to its first section) is the tool's description, each `Args:` entry the
description of its parameter, the type hint its type: `str`, `int`, `float`, `bool`, `list[...]`,
`Literal[...]`, `Optional[...]` (or `X | None`: null allowed), nested as needed. A parameter with a
default is optional; one without is required. The object is closed (`additionalProperties: false`).

Why so strict: a small model picks tools and fills arguments from exactly these words and types, so a
tool without a description, a parameter without one, or a type the schema cannot say (`Any`, `dict`, a
class) is refused here, naming it, rather than registered as something the model can only guess at.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

TOOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")  # what the daemon accepts (agents/tools.py)
SECTIONS = ("args", "arguments", "parameters", "returns", "return", "raises", "yields", "examples", "example")
_PLAIN = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ToolDefinitionError(ValueError):
    """A function that cannot be offered as a tool as written (no docstring, a parameter without a
    description or type hint, a type JSON Schema cannot say); the message names the function and what to
    fix. Raised in the app, before anything is sent to llmosd."""


def tool_entry(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's manifest entry: {"name", "description", "parameters"}."""
    name = getattr(fn, "__name__", "")
    if not TOOL_NAME.match(name):
        raise ToolDefinitionError(f"{name!r}: a tool name is a letter then up to 63 letters, digits or _")
    summary, described = parse_docstring(inspect.getdoc(fn) or "")
    if not summary:
        raise ToolDefinitionError(f"{name}: a docstring saying what the tool does is needed")
    try:
        hints = typing.get_type_hints(fn, include_extras=False)
    except Exception as e:  # a hint naming something undefined
        raise ToolDefinitionError(f"{name}: its type hints cannot be resolved ({e})") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        where = f"{name}({p.name})"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ToolDefinitionError(f"{where}: a tool takes named parameters only, not *args or **kwargs")
        if p.name not in hints:
            raise ToolDefinitionError(f"{where}: a type hint is needed")
        if not described.get(p.name):
            raise ToolDefinitionError(f"{where}: describe it in the docstring's Args section")
        schema = {**type_schema(hints[p.name], where), "description": described.pop(p.name)}
        if p.default is p.empty:
            required.append(p.name)
        elif _json_value(p.default):
            schema["default"] = p.default
        properties[p.name] = schema
    if described:
        raise ToolDefinitionError(f"{name}: the docstring describes no parameter {', '.join(described)}")
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    parameters["additionalProperties"] = False
    return {"name": name, "description": summary, "parameters": parameters}


def type_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON Schema of one type hint."""
    if hint in _PLAIN:
        return {"type": _PLAIN[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        values = list(args)
        kinds = {type(v) for v in values}
        if not values or not kinds <= set(_PLAIN):
            raise ToolDefinitionError(f"{where}: Literal values must be str, int, float or bool")
        schema: dict[str, Any] = {"enum": values}
        if len(kinds) == 1:
            schema = {"type": _PLAIN[kinds.pop()], **schema}
        return schema
    if origin is list:
        if len(args) != 1:
            raise ToolDefinitionError(f"{where}: say what the list holds, e.g. list[str]")
        return {"type": "array", "items": type_schema(args[0], where)}
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if len(present) == len(args):
            raise ToolDefinitionError(f"{where}: a union is only supported as Optional[X] (X | None)")
        inner = type_schema(present[0], where) if len(present) == 1 else {"anyOf": []}
        if len(present) > 1:
            inner["anyOf"] = [type_schema(a, where) for a in present]
        if set(inner) == {"type"}:  # compact, as the model reads it: {"type": ["string", "null"]}
            return {"type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    raise ToolDefinitionError(
        f"{where}: the type {getattr(hint, '__name__', hint)!s} cannot be a tool parameter "
        "(str, int, float, bool, list[...], Literal[...], Optional[...])"
    )


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the summary before the first section, {parameter: description} from the Args section).
    Google style: `name: text` or `name (type): text`, continued on more indented lines."""
    summary: list[str] = []
    described: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    entry_indent = -1
    for line in doc.splitlines():
        stripped = line.strip()
        heading = stripped[:-1].lower() if stripped.endswith(":") else None
        indent = len(line) - len(line.lstrip())
        if heading in SECTIONS and indent == 0:
            section, current, entry_indent = heading, None, -1
            continue
        if section is None:
            summary.append(stripped)
        elif section in ("args", "arguments", "parameters") and stripped:
            m = re.match(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m and (entry_indent < 0 or indent <= entry_indent):
                entry_indent = indent
                current = m.group(1)
                described[current] = m.group(2).strip()
            elif current is not None:
                described[current] = f"{described[current]} {stripped}".strip()
    return " ".join(" ".join(summary).split()), described


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
