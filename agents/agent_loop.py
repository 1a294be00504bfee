"""The agent loop: the model proposes a tool call or an answer, tools run, their results go back to the
model as data, until an answer or the step budget.

Each step's output is constrained (a JSON Schema or a grammar, built by the run's `ToolCallFormat` from
the strict parameters of the tools the run may use), so a call always names a real tool with arguments
valid for it, holding only keys it declares; no retry on malformed calls. A step that may call a tool
gets the tokens its largest call needs (agents/call_budget.py), so a call always ends; one that is cut
anyway (by the context, or by a cap lowered to fit) is never made: it is the run's last step, named
with the text written so far. Tool results go back marked as data; nothing in them can add tools or
permissions (those live in the registry, outside the text).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.call_budget import CallBudget, call_budget
from agents.grounding import call_schema, tie_to_request
from agents.step_draft import partial_arguments
from agents.tool_choice import Score, ScoringUnavailableError, choice_prompt, choose_tool
from agents.tool_format import (
    ANSWER_CHARS,
    DATA_NOTE,
    JSON_STEPS,
    InvalidStepError,
    StepCutError,
    ToolCallFormat,
)
from agents.tool_view import tool_line
from agents.tools import Tool, argument_problems


class CallTooLargeError(InvalidStepError):
    """The run must call a tool, and no tool's smallest call fits the tokens a step may take."""


# What the agent is for; the format adds how to call tools (JSON steps, or the model's own format) and
# that tool results are data.
INSTRUCTIONS = "You are an assistant that can use tools."

# generate(messages, json_schema or None, *, grammar=None, tools=None, grammar_tokens=None, step=None,
# **sampling) -> text: `grammar` constrains instead of a schema, `tools` go to the chat template,
# `grammar_tokens` is the most tokens the constraint admits (the largest call: the step may take that many,
# past the run's max_tokens), `step` the number of the step the text becomes, in the run's tool format (so
# the daemon can stream it as it is written), sampling overrides e.g. repetition_penalty or a lower
# max_tokens
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
    # a call cut short, never made: the step's text so far (`tool` names it if the name was written whole)
    partial: str | None = None

    def to_json(self) -> str:
        d: dict[str, Any] = {"step": self.number}
        if self.partial is not None:
            d.update(tool=self.tool, arguments_text=partial_arguments(self.partial))
            if self.arguments:  # whole, but at a lowered cap: a value may have been cut short
                d["arguments"] = self.arguments
            d.update(partial=self.partial, cut=True)
        elif self.tool is not None:
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
    max_call_tokens: int | None = None,  # the most a step that may call a tool may take; None: max_step
    score: Score | None = None,  # the engine's likelihood of given continuations: tools are chosen by it
) -> AsyncIterator[Step]:
    """Yield each step; the last one carries the answer (forced at the step budget), or is a call cut
    short (StepCutError follows it). With `score` (and JSON steps, constrained), the tool or the answer
    is chosen by retrieval and the model's likelihood, then only the chosen call is generated
    (`_scored_steps`); without it, the model picks among all tools as it generates."""
    by_name = {t.name: t for t in tools}
    ceiling = max(max_step_tokens, max_call_tokens or max_step_tokens)
    budget = call_budget(tools, fmt.call_overhead, ceiling)
    offered = [t for t in tools if t.name in budget.calls]  # those whose calls fit the ceiling
    if tools and not offered and tool_choice == "required":
        raise CallTooLargeError(
            f"no tool's call fits in {ceiling} tokens ({', '.join(sorted(budget.left_out))}); lower the "
            "tools' limits or raise [limits] max_tokens"
        )
    if (
        score is not None
        and constrained
        and fmt.name == JSON_STEPS.name
        and offered
        and tool_choice != "none"
    ):
        scored = _scored_steps(
            goal,
            offered,
            budget,
            generate,
            call_tool,
            score,
            max_steps=max_steps,
            tool_choice=tool_choice,
            instructions=instructions,
            max_step_tokens=max_step_tokens,
            fmt=fmt,
        )
        try:
            first = await anext(scored)
        except ScoringUnavailableError:
            pass  # the engine could not score now: this run generates its choices
        else:
            yield first
            async for step in scored:
                yield step
            return
    grammar_tokens = max(max_step_tokens, budget.tokens)
    messages = [
        {"role": "system", "content": fmt.system_prompt(offered, instructions)},  # only what it can call
        {"role": "user", "content": goal},
    ]
    answer_chars = max(8, min(ANSWER_CHARS, (max_step_tokens - 16) * 3))
    template_tools = fmt.template_tools(offered)  # the same every step
    made: set[str] = set()  # each call made: tool and arguments, as JSON
    must_answer = False
    number = 0  # steps shown; a repeated call is not one
    for generation in range(1, max_steps + 1):
        last = generation == max_steps or must_answer
        may_call = not last and tool_choice != "none" and bool(offered)
        spec = fmt.constraint(
            offered,
            allow_answer=not (generation == 1 and tool_choice == "required" and offered),
            allow_tools=may_call,
            # about 3 characters a token at least for most text; an answer cut by the token limit anyway
            # is kept and marked (below), never dropped or passed off as whole
            answer_chars=answer_chars,
            parameters=budget.parameters(),
        )
        # the grammar bounds a call: without it (a measurement) nothing does, and the caller's limit holds
        tokens = grammar_tokens if may_call and constrained else max_step_tokens
        text = await generate(
            messages,
            spec.json_schema if constrained else None,
            grammar=spec.grammar if constrained else None,
            tools=template_tools,
            step=number + 1,  # the step this text becomes: the daemon streams it to the run's owner
            **({"grammar_tokens": tokens} if tokens > max_step_tokens else {}),
        )
        number += 1
        if getattr(text, "finish_reason", "stop") in ("length", "context"):
            partial = fmt.cut_answer(text)
            if partial is None:  # a call cut short: named, with what was written, and never made
                name = fmt.cut_call(text)
                yield Step(number, tool=name, partial=str(text))
                ran_out = "the context" if getattr(text, "finish_reason", "") == "context" else "tokens"
                raise StepCutError(
                    f"step {number} ran out of {ran_out} in the middle of a call of {name or 'a tool'}; "
                    f"the call was not made (the step had {tokens} tokens)"
                )
            yield Step(number, answer=partial.rstrip() + " …", cut=True)
            return
        decided = fmt.parse(text, by_name)  # constrained: always one of the branches
        if "answer" in decided:
            whole = len(decided["answer"]) < answer_chars  # at the limit, the constraint closed it
            yield Step(number, answer=decided["answer"] if whole else decided["answer"] + " …", cut=not whole)
            return
        fitted = budget.calls.get(decided["tool"])
        if constrained and fitted is not None and fitted.reached_lowered_cap(decided["arguments"]):
            yield Step(number, tool=decided["tool"], arguments=decided["arguments"], partial=str(text))
            raise StepCutError(
                f"step {number}: the call of {decided['tool']} reached a length its tool's limits were "
                f"lowered to, to fit {ceiling} tokens, so a value may be cut short; the call was not made"
            )
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


FOLLOW_UP_SHARE = 0.8  # a later call's tool must match the goal about as well as the first call's did


async def _scored_steps(
    goal: str,
    offered: list[Tool],
    budget: CallBudget,
    generate: Generate,
    call_tool: CallTool,
    score: Score,
    *,
    max_steps: int,
    tool_choice: str,
    instructions: str,
    max_step_tokens: int,
    fmt: ToolCallFormat,
) -> AsyncIterator[Step]:
    """Steps whose tool (or answer) is chosen by agents/tool_choice.py; only the chosen call is
    generated, against its strict schema narrowed to the request (agents/grounding.py), with the tool
    shown in plain words. A tool whose call succeeded is not offered again in the run (its result is
    what the run has; only an error result lets it be retried), so a side effect happens once however
    the next step's arguments would differ."""
    answer_chars = max(8, min(ANSWER_CHARS, (max_step_tokens - 16) * 3))
    history: list[dict[str, str]] = []
    done: set[str] = set()
    first_retrieval = 0.0
    candidates: list[Tool] = offered[:0]
    for number in range(1, max_steps + 1):
        pool = [t for t in offered if t.name not in done]
        choice = None
        if number < max_steps and pool:
            try:
                choice = await choose_tool(
                    goal,
                    pool,
                    score,
                    instructions=instructions,
                    must_call=number == 1 and tool_choice == "required",
                    history=history,
                    # a later call: only of a tool the goal names about as clearly as the first call's
                    min_retrieval=FOLLOW_UP_SHARE * first_retrieval,
                )
            except ScoringUnavailableError:
                if number == 1:
                    raise  # nothing yielded yet: run_agent generates the run's choices instead
                choice = None  # the engine is full: answer with what the run has
            candidates = choice.candidates if choice is not None and choice.candidates else candidates
        if choice is None or choice.tool is None:
            spec = fmt.constraint([], allow_answer=True, allow_tools=False, answer_chars=answer_chars)
            text = await generate(
                choice_prompt(goal, candidates, instructions) + history,
                spec.json_schema,
                step=number,  # streamed to the run's owner as it is written, as on the generated path
            )
            if getattr(text, "finish_reason", "stop") in ("length", "context"):
                yield Step(number, answer=(fmt.cut_answer(text) or "").rstrip() + " …", cut=True)
                return
            answer = fmt.parse(text, {})["answer"]
            whole = len(answer) < answer_chars
            yield Step(number, answer=answer if whole else answer + " …", cut=not whole)
            return
        tool = choice.tool
        if number == 1:
            first_retrieval = choice.detail.get("retrieval", 0.0)
        fitted = budget.calls[tool.name]
        schema, _fixed = call_schema(tool, goal, fitted.parameters)
        shown = tool_line(tool, list(schema["properties"]))  # what this call may fill, in plain words
        system = f"{instructions} {JSON_STEPS.HOW} {DATA_NOTE}\n\nTools:\n{shown}"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": goal}, *history]
        spec = fmt.constraint(
            [tool],
            allow_answer=False,
            allow_tools=True,
            answer_chars=answer_chars,
            parameters={tool.name: schema},
        )
        tokens = max(max_step_tokens, fitted.tokens)
        text = await generate(
            messages,
            spec.json_schema,
            step=number,
            **({"grammar_tokens": tokens} if tokens > max_step_tokens else {}),
        )
        if getattr(text, "finish_reason", "stop") in ("length", "context"):
            yield Step(number, tool=tool.name, partial=str(text))
            raise StepCutError(
                f"step {number} ran out of tokens in the middle of a call of {tool.name}; "
                f"the call was not made (the step had {tokens} tokens)"
            )
        arguments = fmt.parse(text, {tool.name: tool})["arguments"]
        if fitted.reached_lowered_cap(arguments):
            yield Step(number, tool=tool.name, arguments=arguments, partial=str(text))
            raise StepCutError(
                f"step {number}: the call of {tool.name} reached a length its tool's limits were lowered "
                "to, so a value may be cut short; the call was not made"
            )
        tied = tie_to_request(tool, arguments, goal)
        if not argument_problems(fitted.parameters, tied):
            arguments = tied
        step = Step(number, tool=tool.name, arguments=arguments)
        step.observation = await call_tool(tool, arguments)
        if not (isinstance(step.observation, dict) and "error" in step.observation):
            done.add(tool.name)  # it did what it does: the run does not do it again
        history += [
            {"role": "assistant", "content": json.dumps({"tool": tool.name, "arguments": arguments})},
            fmt.observation(tool.name, step.observation),
        ]
        yield step
