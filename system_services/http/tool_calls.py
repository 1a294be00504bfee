"""OpenAI `tools` and `tool_choice` through llmos's own tool formats: offered, constrained, parsed.

A request's tools become agents' `Tool`s (validated as an app's manifest is, with their strict form:
closed objects, bounded values), offered the way the model knows (agents/tool_format.py: listed in the
system prompt as JSON steps for SmolLM2, or by the chat template in Hermes format), and the answer is
constrained by the format's grammar, so a `tool_calls` entry always names a tool the request offered
with arguments valid for it. `tool_choice` picks the branches: "auto" (a call or an answer),
"required" (a call), one named function (a call of it), "none" (no tools offered at all).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from agents.tool_format import InvalidStepError, StepConstraint, ToolCallFormat
from agents.tools import Tool, ToolSpec
from llmos.errors import LlmosError, validation_problems
from system_services.http.wire import HttpError

MAX_TOOLS = 64
DEFAULT_INSTRUCTIONS = "You are a helpful assistant."


@dataclass
class ToolPlan:
    fmt: ToolCallFormat
    tools: dict[str, Tool]
    constraint: StepConstraint

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The conversation with the tools described in its system turn (the client's own system text
        kept as the instructions)."""
        system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        text = self.fmt.system_prompt(list(self.tools.values()), "\n".join(system) or DEFAULT_INSTRUCTIONS)
        return [{"role": "system", "content": text}, *rest]

    def prompt(self, daemon: Any, messages: list[dict[str, str]]) -> Any:
        """Messages, or the text the chat template renders when it takes the tools itself (Hermes)."""
        tools = self.fmt.template_tools(list(self.tools.values()))
        if tools is None or daemon.model.chat_template is None:
            return messages
        return daemon.model.chat_template.render(messages, tools=tools)

    def message(self, text: str, cut: bool) -> tuple[dict[str, Any], str]:
        """The assistant message in OpenAI's shape and the finish reason."""
        try:
            step = self.fmt.parse(text, self.tools)
        except InvalidStepError:
            partial = self.fmt.cut_answer(text) if cut else None
            return {"role": "assistant", "content": partial if partial is not None else text}, "length"
        if "answer" in step:
            return {"role": "assistant", "content": step["answer"]}, "length" if cut else "stop"
        call = {
            "id": "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {
                "name": step["tool"],
                "arguments": json.dumps(step["arguments"], ensure_ascii=False),
            },
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


def plan(fmt: ToolCallFormat, raw_tools: Any, choice: Any, caller: Any, answer_chars: int) -> ToolPlan | None:
    """None when no tools are offered (none or an empty list given, or tool_choice "none")."""
    if raw_tools is None or raw_tools == [] or choice == "none":
        return None
    if not isinstance(raw_tools, list) or not 0 < len(raw_tools) <= MAX_TOOLS:
        raise HttpError(400, f"tools must be an array of 1 to {MAX_TOOLS} functions", "invalid_type")
    tools: dict[str, Tool] = {}
    for i, raw in enumerate(raw_tools):
        fn = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise HttpError(400, f"tools[{i}] must be {{type: function, function: {{name, ...}}}}")
        try:
            spec = ToolSpec(
                name=fn.get("name"),
                description=fn.get("description") or str(fn.get("name")),
                parameters=fn.get("parameters") or {"type": "object", "properties": {}},
            )
        except ValidationError as e:
            raise HttpError(400, f"tools[{i}]: {validation_problems(e, 'tool')}") from None
        except LlmosError as e:
            raise HttpError(400, f"tools[{i}]: {e}") from None
        tools[spec.name] = Tool(spec, caller.unique_name, caller.app_id, "", caller.uid)
    allow_answer = True
    offered = list(tools.values())
    if choice == "required":
        allow_answer = False
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in tools:
            raise HttpError(400, "tool_choice names no function of tools")
        offered, allow_answer = [tools[name]], False
    elif choice not in (None, "auto"):
        raise HttpError(400, 'tool_choice must be "none", "auto", "required" or {type: function, ...}')
    constraint = fmt.constraint(
        offered, allow_answer=allow_answer, allow_tools=True, answer_chars=answer_chars
    )
    return ToolPlan(fmt, tools, constraint)
