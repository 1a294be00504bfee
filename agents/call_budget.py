"""The tokens a step that may call a tool needs, and its grammar cut to what fits, so a step never runs
out of tokens in the middle of a call.

With every object closed and every string, array and number bounded (agents/strict_schema.py), the
grammar of a call admits finitely many texts, and `max_bytes` bounds their length; a token is at least
one byte, so a call never takes more tokens than its bytes (plus the end-of-sequence token). A step that
may call a tool is given that many tokens, even past the run's `max_tokens` (which bounds answers: the
grammar already bounds calls, and a call uses only what it writes), up to `ceiling`, the most any
request may ask for (`[limits] max_tokens`). A tool whose largest call is over the ceiling is offered
with its string and array caps lowered until it fits; a call that then reaches a lowered cap may have
been cut short by it, so it is not made: the step ends as a cut call, named to the app. A tool whose
call cannot fit even with every cap at its least is left out of the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agents.arguments import argument_problems
from agents.strict_schema import max_bytes
from agents.tools import Tool

SCALE_STEPS = 12  # halvings of the search for the largest scale that fits: caps within 1/4096 of it


@dataclass(frozen=True)
class FittedCall:
    """How one tool is offered in a step: its strict parameters (caps lowered if it had to be) and the
    most tokens a call of it takes."""

    tool: Tool
    parameters: dict[str, Any]
    tokens: int
    scale: float = 1.0  # < 1: caps lowered to fit

    def reached_lowered_cap(self, arguments: Any) -> bool:
        """Whether a call's arguments reach one of the lowered caps (so a value may have been cut)."""
        if self.scale >= 1:
            return False
        return bool(argument_problems(self.tool.spec.scaled_parameters(self.scale, probe=True), arguments))


@dataclass(frozen=True)
class CallBudget:
    calls: dict[str, FittedCall]  # by the name the run sees, the tools a step may call
    left_out: dict[str, int]  # tools whose smallest call does not fit: the tokens it would need
    tokens: int  # what a step that may call any of them needs: the largest call

    def parameters(self) -> dict[str, dict[str, Any]]:
        return {name: c.parameters for name, c in self.calls.items()}


def call_budget(tools: Sequence[Tool], overhead: Callable[[Tool], int], ceiling: int) -> CallBudget:
    """Fit each tool's call into `ceiling` tokens; `overhead(tool)` is the bytes of the step around the
    arguments (the call's own markup, the tool's name)."""
    calls: dict[str, FittedCall] = {}
    left_out: dict[str, int] = {}
    for tool in tools:
        fitted = _fit(tool, overhead(tool) + 1, ceiling)  # + 1: the end-of-sequence token
        if isinstance(fitted, FittedCall):
            calls[tool.name] = fitted
        else:
            left_out[tool.name] = fitted
    return CallBudget(calls, left_out, max((c.tokens for c in calls.values()), default=0))


def _fit(tool: Tool, around: int, ceiling: int) -> FittedCall | int:
    def need(scale: float) -> float:
        params = tool.spec.strict_parameters if scale >= 1 else tool.spec.scaled_parameters(scale)
        return around + max_bytes(params)

    full = need(1.0)
    if full <= ceiling:
        return FittedCall(tool, tool.spec.strict_parameters, int(full))
    least = need(0.0)
    if least > ceiling:
        return int(least) if least != math.inf else -1
    low, high = 0.0, 1.0  # need(low) fits, need(high) does not
    for _ in range(SCALE_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if need(mid) <= ceiling else (low, mid)
    return FittedCall(tool, tool.spec.scaled_parameters(low), int(need(low)), low)
