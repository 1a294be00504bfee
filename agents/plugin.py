"""What an agent is, for plugin authors: a name, a description, instructions, the tools it needs, and
optionally its own step logic.

An agent plugin is an `AgentPlugin` instance published under the entry-point group `llmos.agents`
(see docs/writing-agents.md). The daemon runs it for a caller with an `AgentContext`: the input, the tools
that caller may use, and the model, all through the same arbiter, permissions and constraints as any
run. The default step logic is the planner/executor loop (`run_agent`) with the plugin's instructions;
a plugin with a different shape of work (summarize in parts, extract then act) overrides `steps`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agents.agent_loop import INSTRUCTIONS, CallTool, Generate, Step, run_agent
from agents.tool_choice import Score
from agents.tool_format import JSON_STEPS, ToolCallFormat
from agents.tools import Tool
from llmos.errors import LlmosError

AGENT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")


class AgentPluginError(LlmosError):
    """A plugin that does not load, or does not describe a usable agent."""

    dbus_name = "InvalidArgument"


class MissingToolError(LlmosError):
    """The agent needs a tool that no provider the caller may use offers."""

    dbus_name = "NotFound"


@dataclass
class AgentContext:
    """One run of an agent: what it works on and what it may use. Everything goes through the daemon:
    `generate` is queued by the arbiter at the run's priority and `call_tool` enforces `confirm`."""

    input: str  # the caller's goal or text
    tools: Sequence[Tool]  # what this run may call: the caller's own and shared tools the agent uses
    generate: Generate  # (messages, json_schema or None) -> text; with a schema the text always parses
    call_tool: CallTool  # (tool, arguments) -> the result, or {"error": ...}; never raises for a tool
    count_tokens: Callable[[str], int]  # in the served model's tokenizer
    context_length: int  # tokens one generation may hold, prompt and output together
    max_steps: int
    max_step_tokens: int  # output tokens one generation may take
    tool_choice: str = "auto"
    # the most tokens a step whose grammar bounds it may take (the largest call of a tool: see
    # agents/call_budget.py), past max_step_tokens; 0: max_step_tokens
    max_call_tokens: int = 0
    constrained: bool = True
    tool_format: ToolCallFormat = JSON_STEPS  # how tool calls look for the served model
    # the model's likelihood of given continuations (agents/tool_choice.py): the default loop chooses
    # tools by it; None: the model chooses as it generates
    score: Score | None = None

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


class AgentPlugin:
    """Subclass (or instantiate) and publish under `llmos.agents`. Class attributes are the defaults."""

    name: str = ""
    description: str = ""
    instructions: str = INSTRUCTIONS  # the system prompt of the default step logic
    # Tools the agent needs, by the name a run sees: a plain name is the calling app's own tool (or a
    # system tool), "<app id>/<name>" another app's shared one (agents/tools.py). A run fails with
    # NotFound unless the caller may use each one, and only these are offered. None: every tool the
    # caller may use.
    tools: tuple[str, ...] | None = None

    def __init__(self, **overrides: Any) -> None:
        for key, value in overrides.items():
            if not hasattr(type(self), key):
                raise AgentPluginError(f"AgentPlugin has no attribute {key!r}")
            setattr(self, key, value)

    def check(self) -> None:
        """Refuse a plugin that cannot be listed or run, naming what is wrong."""
        if not isinstance(self.name, str) or not AGENT_NAME.match(self.name):
            raise AgentPluginError(
                f"agent name {self.name!r}: a lower-case letter, then up to 47 of a-z 0-9 _ -"
            )
        if not isinstance(self.description, str) or not 0 < len(self.description) <= 500:
            raise AgentPluginError(f"agent {self.name}: a description of 1-500 characters is needed")
        if not isinstance(self.instructions, str) or not self.instructions.strip():
            raise AgentPluginError(f"agent {self.name}: instructions must be non-empty text")
        if self.tools is not None and not (
            isinstance(self.tools, tuple | list) and all(isinstance(t, str) for t in self.tools)
        ):
            raise AgentPluginError(f"agent {self.name}: tools must be a tuple of tool names, or None")

    def select_tools(self, usable: Sequence[Tool]) -> list[Tool]:
        """The tools this agent gets from those the caller may use."""
        if self.tools is None:
            return list(usable)
        by_name = {t.name: t for t in usable}
        missing = [n for n in self.tools if n not in by_name]
        if missing:
            raise MissingToolError(
                f"agent {self.name} needs the tool(s) {', '.join(missing)}, which no provider you may "
                "use offers; register them with RegisterToolProvider first"
            )
        return [by_name[n] for n in self.tools]

    def steps(self, ctx: AgentContext) -> AsyncIterator[Step]:
        """The run, one Step at a time; the last carries the answer. Default: plan over the tools."""
        return run_agent(
            ctx.input,
            ctx.tools,
            ctx.generate,
            ctx.call_tool,
            max_steps=ctx.max_steps,
            tool_choice=ctx.tool_choice,
            instructions=self.instructions,
            constrained=ctx.constrained,
            max_step_tokens=ctx.max_step_tokens,
            fmt=ctx.tool_format,
            max_call_tokens=ctx.max_call_tokens or None,
            score=ctx.score,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "tools": None if self.tools is None else list(self.tools),
            "custom_steps": type(self).steps is not AgentPlugin.steps,
        }


__all__ = ["AgentContext", "AgentPlugin", "AgentPluginError", "MissingToolError", "Step"]
