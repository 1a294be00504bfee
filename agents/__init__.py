"""The agent layer: structured output, tools, planner/executor, plugins."""
