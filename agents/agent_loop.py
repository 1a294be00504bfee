"""The agent loop: the model proposes a tool call or an answer, tools run, their results go back to the
model as data, until an answer or the step budget.

Each step's output is constrained (a JSON Schema or a grammar, built by the run's `ToolCallFormat` from
the tools the run may use), so a call always names a real tool with arguments valid for it; no retry on
malformed calls. Tool results go back marked as data; nothing in them can add tools or permissions
(those live in the registry, outside the text).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.tool_format import ANSWER_CHARS, JSON_STEPS, StepCutError, ToolCallFormat
from agents.tools import Tool

# What the agent is for; the format adds how to call tools (JSON steps, or the model's own format) and
# that tool results are data.
INSTRUCTIONS = "You are an assistant that can use tools."

# generate(messages, json_schema or None, *, grammar=None, tools=None, **sampling) -> text: `grammar`
# constrains instead of a schema, `tools` go to the chat template, sampling overrides e.g.
# repetition_penalty or a lower max_tokens
Generate = Callable[..., Awaitable[str]]
CallTool = Callable[[Tool, dict[str, Any]], Awaitable[Any]]  # -> the result (a JSON value)


@dataclass
class Step:
    number: int
    tool: str | None = None  # a tool call, or None for the answer
    arguments: dict[str, Any] = field(default_factory=dict)
    observation: Any = None  # what the tool returned (or {"error": ...})
    answer: str | None = None
    text: str | None = None  # work in between, e.g. a summary of one part (custom step logic)
    cut: bool = False  # the answer ran out of tokens (or of its length limit): it ends with " …"

    def to_json(self) -> str:
        d: dict[str, Any] = {"step": self.number}
        if self.tool is not None:
            d.update(tool=self.tool, arguments=self.arguments, observation=self.observation)
        elif self.answer is not None:
            d["answer"] = self.answer
            if self.cut:
                d["cut"] = True
        else:
            d["text"] = self.text
        text = json.dumps(d, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a tool: escaped, D-Bus carries only UTF-8
            return json.dumps(d)
        return text


async def run_agent(
    goal: str,
    tools: Sequence[Tool],
    generate: Generate,
    call_tool: CallTool,
    *,
    max_steps: int = 6,
    tool_choice: str = "auto",  # "required": the first step must call a tool; "none": answer directly
    instructions: str = INSTRUCTIONS,
    constrained: bool = True,  # False only to measure what constraining buys (bench/agents.py)
    max_step_tokens: int = 1024,
    fmt: ToolCallFormat = JSON_STEPS,  # how calls look: the model's own format, or JSON steps
) -> AsyncIterator[Step]:
    """Yield each step; the last one carries the answer (forced at the step budget)."""
    by_name = {t.name: t for t in tools}
    messages = [
        {"role": "system", "content": fmt.system_prompt(tools, instructions)},
        {"role": "user", "content": goal},
    ]
    answer_chars = max(8, min(ANSWER_CHARS, (max_step_tokens - 16) * 3))
    template_tools = fmt.template_tools(tools)  # the same every step
    made: set[str] = set()  # each call made: tool and arguments, as JSON
    must_answer = False
    number = 0  # steps shown; a repeated call is not one
    for generation in range(1, max_steps + 1):
        last = generation == max_steps or must_answer
        spec = fmt.constraint(
            tools,
            allow_answer=not (generation == 1 and tool_choice == "required" and tools),
            allow_tools=not last and tool_choice != "none",
            # about 3 characters a token at least for most text; an answer cut by the token limit anyway
            # is kept and marked (below), never dropped or passed off as whole
            answer_chars=answer_chars,
        )
        text = await generate(
            messages,
            spec.json_schema if constrained else None,
            grammar=spec.grammar if constrained else None,
            tools=template_tools,
        )
        number += 1
        if getattr(text, "finish_reason", "stop") in ("length", "context"):
            partial = fmt.cut_answer(text)
            if partial is None:
                raise StepCutError(
                    f"step {number} ran out of tokens in the middle of a tool call; give the run a larger "
                    f"max_tokens (it was {max_step_tokens})"
                )
            yield Step(number, answer=partial.rstrip() + " …", cut=True)
            return
        decided = fmt.parse(text, by_name)  # constrained: always one of the branches
        if "answer" in decided:
            whole = len(decided["answer"]) < answer_chars  # at the limit, the constraint closed it
            yield Step(number, answer=decided["answer"] if whole else decided["answer"] + " …", cut=not whole)
            return
        key = json.dumps([decided["tool"], decided["arguments"]], sort_keys=True)
        if key in made:  # a small model repeats a call rather than answer: it has what it can get, so
            number -= 1  # the repeat is dropped and the next generation must answer
            must_answer = True
            continue
        made.add(key)
        messages.append({"role": "assistant", "content": text})
        tool = by_name[decided["tool"]]
        step = Step(number, tool=tool.name, arguments=decided["arguments"])
        step.observation = await call_tool(tool, step.arguments)
        messages.append(fmt.observation(tool.name, step.observation))
        yield step
