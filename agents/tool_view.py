"""How a tool is shown to the model when the system chooses for it: name, description, and its
parameters as plain words (name, type, description, allowed values), never the JSON Schema itself.

Shown raw schemas, a small model copies their keywords into the call (`{"query": "…", "type":
"string"}`, issue 12); plain words have nothing to copy. Required parameters come first; optional ones
are shown only when the step may fill them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from agents.tools import Tool

MAX_DESCRIPTION = 160  # characters of a parameter's description shown


def _type_words(prop: dict[str, Any]) -> str:
    t = prop.get("type")
    if isinstance(t, list):
        t = "/".join(str(x) for x in t if x != "null")
    if prop.get("enum"):
        return "one of " + ", ".join(str(v) for v in prop["enum"][:12])
    if t == "array":
        item = prop.get("items") if isinstance(prop.get("items"), dict) else {}
        return f"list of {item.get('type', 'values')}"
    return str(t or "value")


def parameter_line(name: str, prop: Any, required: bool) -> str:
    prop = prop if isinstance(prop, dict) else {}
    words = _type_words(prop) + ("" if required else ", optional")
    desc = str(prop.get("description", "")).strip()[:MAX_DESCRIPTION]
    return f"{name} ({words})" + (f": {desc}" if desc else "")


def tool_line(tool: Tool, shown: Iterable[str] | None = None) -> str:
    """One line: `- name: description Arguments: a (string): …; b (integer, optional)`; `shown` limits
    the parameters to those names (default: the required ones)."""
    params = tool.spec.parameters
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    required = [n for n in params.get("required") or [] if n in props]
    names = list(shown) if shown is not None else required
    order = [n for n in required if n in names] + [n for n in names if n not in required and n in props]
    args = "; ".join(parameter_line(n, props.get(n), n in required) for n in order)
    return f"- {tool.name}: {tool.spec.description.strip()}" + (f" Arguments: {args}" if args else "")


def tools_block(tools: Sequence[Tool], shown: dict[str, list[str]] | None = None) -> str:
    return "\n".join(tool_line(t, (shown or {}).get(t.name)) for t in tools)
