"""Which tool a step calls, or whether it answers, decided by scoring instead of free generation.

Free generation over fourteen tools let SmolLM2-135M pick nearly the same tool for every request and
answer where it should call (issue 12). Here the choice is made in two parts:

1. Retrieval (agents/tool_retrieval.py) ranks the tools by the words the request shares with each
   one's name, description and parameters; the best `CANDIDATES` go on.
2. The model scores, in one pass over one prompt that shows those candidates in plain words
   (agents/tool_view.py), the start of a call of each and the start of an answer
   (llmos.engine.scoring). The tool picked is the best of: the call's mean token log-likelihood plus
   `RETRIEVAL_WEIGHT` times its retrieval score relative to the best one. A step may answer instead
   when the call-start is not likelier than the answer-start by enough, retrieval counted in:
   `call_margin + DECIDE_RETRIEVAL * top retrieval score > DECIDE_THRESHOLD`.

The weights were fitted on bench/agent_suite.py's multi-app cases (half of them; the other half held
out: docs/performance.md gives both), not on single cases.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.tool_format import DATA_NOTE, JsonSteps
from agents.tool_retrieval import ToolIndex
from agents.tool_view import tools_block
from agents.tools import Tool
from llmos.errors import LlmosError

CANDIDATES = 4
RETRIEVAL_WEIGHT = 1.0
DECIDE_RETRIEVAL = 1.5
DECIDE_THRESHOLD = 4.5
CALL_START, ANSWER_START = '{"tool":', '{"answer":'

# score(messages, continuations) -> each continuation's token log-likelihoods after the rendered
# messages (the assistant's turn opened): one batched scoring pass of the engine
Score = Callable[[list[dict[str, str]], list[str]], Awaitable[list[list[float]]]]


class ScoringUnavailableError(LlmosError):
    """The engine cannot score now (no free KV slot): the step falls back to constrained generation."""


@dataclass(frozen=True)
class Choice:
    tool: Tool | None  # None: answer without a tool
    candidates: list[Tool]
    detail: dict[str, Any] = field(default_factory=dict)  # the scores, for logs and benches


def choice_prompt(goal: str, candidates: Sequence[Tool], instructions: str) -> list[dict[str, str]]:
    system = f"{instructions} {JsonSteps.HOW} {DATA_NOTE}\n\nTools:\n{tools_block(candidates)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": goal}]


async def choose_tool(
    goal: str,
    tools: Sequence[Tool],
    score: Score,
    *,
    instructions: str,
    must_call: bool,
    history: Sequence[dict[str, str]] = (),
    min_retrieval: float = 0.0,
) -> Choice:
    """The tool to call for `goal` (or None: answer). `history`: the run's turns after the goal (calls
    made and their results), so a later step decides with what it already has. Below `min_retrieval`
    (a later step: nothing left matches the goal as the first call did) it answers without scoring."""
    ranked = ToolIndex(tools).rank(goal)[:CANDIDATES]
    top = max((r.score for r in ranked), default=0.0)
    if not ranked or (not must_call and top < min_retrieval):
        return Choice(None, [r.tool for r in ranked], {"retrieval": round(top, 3)})
    candidates = [r.tool for r in ranked]
    messages = choice_prompt(goal, candidates, instructions) + list(history)
    calls = [f'{{"tool": "{t.name}"' for t in candidates]
    starts = [] if must_call else [ANSWER_START, CALL_START]  # a step that must call has no choice there
    logps = await score(messages, [*starts, *calls])
    answer_lp, call_lp = (sum(logps[0]), sum(logps[1])) if starts else (0.0, 0.0)
    best, best_value, values = None, float("-inf"), {}
    for r, lp in zip(ranked, logps[len(starts) :], strict=True):
        value = sum(lp) / len(lp) + RETRIEVAL_WEIGHT * (r.score / top if top > 0 else 0.0)
        values[r.tool.name] = round(value, 3)
        if value > best_value:
            best, best_value = r.tool, value
    margin = call_lp - answer_lp
    calls_it = must_call or margin + DECIDE_RETRIEVAL * top > DECIDE_THRESHOLD
    detail = {"margin": round(margin, 3), "retrieval": round(top, 3), "values": values}
    return Choice(best if calls_it else None, candidates, detail)
