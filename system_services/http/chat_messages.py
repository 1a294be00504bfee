"""OpenAI chat `messages` as llmos chat messages: every role, given as history, never regenerated.

Roles: system and developer (both the system turn), user, assistant, tool. Content is a string or a
list of text parts (other part types, such as images, are refused by name: the model reads text only).
An assistant turn's `tool_calls` are written back in the text the model itself writes for a call
(`call_text`), and a tool turn becomes the tool format's observation, named after the call it answers;
so a conversation with tool use reads to the model exactly as if it had run here.
"""

from __future__ import annotations

import json
from typing import Any

from agents.tool_format import STEP_JSON_STYLE, ToolCallFormat
from llmos import bounded_json
from system_services.http.wire import HttpError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# OpenAI's keys, and Ollama's (tool_name, images, thinking)
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "tool_name", "images", "thinking"}
)
MAX_MESSAGES = 4096


def call_text(fmt: ToolCallFormat, name: str, arguments: Any) -> str:
    """A tool call as the model writes it in `fmt` (see agents/tool_format.py)."""
    sep = (STEP_JSON_STYLE["item_separator"], STEP_JSON_STYLE["key_separator"])
    if fmt.name == "hermes":
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=sep)
        return f"<tool_call>\n{body}\n</tool_call>"
    return json.dumps({"tool": name, "arguments": arguments}, ensure_ascii=False, separators=sep)


def text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise HttpError(400, f"{where}: content parts of type {kind!r} are not supported (text only)")
            parts.append(part["text"])
        return "".join(parts)
    raise HttpError(400, f"{where}: content must be a string or a list of text parts", "invalid_type")


def to_messages(raw: Any, fmt: ToolCallFormat) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise HttpError(400, "messages must be a non-empty array", "invalid_type")
    if len(raw) > MAX_MESSAGES:
        raise HttpError(400, f"at most {MAX_MESSAGES} messages")
    names: dict[str, str] = {}  # tool call id -> tool name
    out: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise HttpError(400, f"{where}: a message is an object with a role of {', '.join(ROLES)}")
        if extra := sorted(set(m) - MESSAGE_KEYS):
            raise HttpError(400, f"{where}: unknown field {extra[0][:64]!r}", "unknown_field")
        if m.get("images"):
            raise HttpError(400, f"{where}: images are not supported (the model reads text only)")
        role, text = ROLES[m["role"]], text_of(m.get("content"), where)
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls(m["tool_calls"], where)
            for call_id, name, _ in calls:
                names[call_id] = name
            text = (text + "\n" if text else "") + "\n".join(call_text(fmt, n, a) for _, n, a in calls)
        if role == "tool":
            name = names.get(str(m.get("tool_call_id")), m.get("name") or m.get("tool_name") or "the tool")
            try:
                result: Any = bounded_json.loads(text, "a tool result")
            except bounded_json.InvalidJsonError:
                result = text
            out.append(fmt.observation(str(name), result))
            continue
        out.append({"role": role, "content": text})
    return out


def _calls(raw: Any, where: str) -> list[tuple[str, str, Any]]:
    if not isinstance(raw, list):
        raise HttpError(400, f"{where}: tool_calls must be an array", "invalid_type")
    calls = []
    for call in raw:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise HttpError(
                400, f"{where}: a tool call is {{id, type: function, function: {{name, arguments}}}}"
            )
        args = fn.get("arguments", "{}")
        try:
            parsed = bounded_json.loads(args, "arguments") if isinstance(args, str) else args
        except bounded_json.InvalidJsonError:
            raise HttpError(400, f"{where}: the arguments of {fn['name'][:64]!r} are not JSON") from None
        calls.append((str(call.get("id", "")), fn["name"], parsed))
    return calls
