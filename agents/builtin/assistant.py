"""The general assistant: the planner/executor loop over every tool the caller may use."""

from agents.agent_loop import INSTRUCTIONS
from agents.plugin import AgentPlugin

ASSISTANT = AgentPlugin(
    name="assistant",
    description="A general assistant: answers the goal, calling the tools you may use when they help.",
    instructions=INSTRUCTIONS,
    tools=None,
)
