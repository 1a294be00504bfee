"""Which agents this daemon offers: the built-in ones, then plugins found under the entry-point group
`llmos.agents`.

Discovery happens once, at start-up (and again on ReloadConfig), so an installed plugin appears after a
restart or reload. A plugin that fails to import, is not an `AgentPlugin`, or takes a name already taken
is left out and reported (ListAgents shows it under "problems", the daemon logs it): one broken package
never stops the daemon or hides the other agents.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from agents.builtin import BUILTIN_AGENTS
from agents.plugin import AgentPlugin, AgentPluginError
from llmos.errors import LlmosError

ENTRY_POINT_GROUP = "llmos.agents"
DEFAULT_AGENT = "assistant"
log = logging.getLogger("llmos.agents")


class UnknownAgentError(LlmosError):
    dbus_name = "NotFound"


@dataclass(frozen=True)
class AgentEntry:
    plugin: AgentPlugin
    source: str  # "built-in", or the distribution that provides it: "llmos-agent-todo 0.1.0"


@dataclass(frozen=True)
class PluginProblem:
    entry_point: str  # as its package declares it: "todo = llmos_agent_todo:AGENT"
    source: str
    error: str


class AgentCatalog:
    def __init__(self, entries: Iterable[AgentEntry], problems: Iterable[PluginProblem] = ()) -> None:
        self.entries = {e.plugin.name: e for e in entries}
        self.problems = list(problems)

    @classmethod
    def discover(cls, builtins: Iterable[AgentPlugin] = BUILTIN_AGENTS) -> AgentCatalog:
        entries = []
        for p in builtins:
            p.check()  # ours: a mistake here is a bug to fail on loudly
            entries.append(AgentEntry(p, "built-in"))
        taken = {e.plugin.name for e in entries}
        problems: list[PluginProblem] = []
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
            source = _source(ep)
            try:
                plugin = _load(ep)
                if plugin.name in taken:
                    raise AgentPluginError(f"the agent name {plugin.name!r} is already taken")
            except Exception as e:  # a plugin's own bug included: reported, never fatal
                why = str(e) if isinstance(e, AgentPluginError) else f"{type(e).__name__}: {e}"
                problems.append(PluginProblem(f"{ep.name} = {ep.value}", source, why))
                log.warning("agent plugin %s (%s) left out: %s", ep.name, source, why)
                continue
            taken.add(plugin.name)
            entries.append(AgentEntry(plugin, source))
            log.info("agent plugin %s from %s", plugin.name, source)
        return cls(entries, problems)

    def get(self, name: str) -> AgentPlugin:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries))
            raise UnknownAgentError(f"no agent named {name!r} (this daemon has: {known})")
        return entry.plugin

    def describe(self) -> dict[str, Any]:
        return {
            "agents": [{**e.plugin.describe(), "source": e.source} for e in self.entries.values()],
            "problems": [vars(p) for p in self.problems],
        }


def _load(ep: EntryPoint) -> AgentPlugin:
    obj = ep.load()
    if isinstance(obj, type) and issubclass(obj, AgentPlugin):
        obj = obj()
    if not isinstance(obj, AgentPlugin):
        raise AgentPluginError(f"{ep.value} is a {type(obj).__name__}, not an agents.plugin.AgentPlugin")
    obj.check()
    if obj.name != ep.name:
        raise AgentPluginError(
            f"the entry point is named {ep.name!r} but the agent calls itself {obj.name!r}"
        )
    return obj


def _source(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
