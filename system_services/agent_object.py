"""The agent layer's front object: /org/llmos/Agent1, org.llmos.Agent1.

Apps register tool providers (an object implementing org.llmos.ToolProvider1 on their own connection,
plus a manifest of tools) and start runs: a goal the model pursues by calling the tools the caller may
use (its own, and other apps' shared ones). A provider's tools go away with its connection.
"""

import itertools
import json
import logging
from typing import Any

from dbus_fast import Variant
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from agents.catalog import DEFAULT_AGENT
from agents.tools import ToolManifest, ToolManifestError
from llmos.errors import LlmosError
from system_services.agent_run import AgentRun, parse_run_options
from system_services.bus_driver import name_has_owner
from system_services.caller import current_sender
from system_services.dbus_errors import error, to_dbus_error
from system_services.system_tools import SYSTEM_APP_ID, SYSTEM_TOOL_NAMES
from system_services.task_object import TaskObject, task_path

IFACE = "org.llmos.Agent1"
PATH = "/org/llmos/Agent1"
VERSION = 1
MAX_GOAL_CHARS = 256 * 1024
_numbers = itertools.count(1)
log = logging.getLogger("llmosd")


class AgentObject(ServiceInterface):
    def __init__(self, daemon: Any) -> None:
        super().__init__(IFACE)
        self.daemon = daemon
        self._starting: set[str] = set()  # task paths of Run calls not yet answered

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "u":
        return VERSION

    @method()
    async def RegisterToolProvider(self, path: "o", manifest: "s") -> "as":
        """Register the tools in `manifest` (JSON), implemented by org.llmos.ToolProvider1.Call at
        `path` on the caller's connection. Returns their names. Registering a name again replaces it."""
        sender = current_sender()
        try:
            parsed = ToolManifest.parse(manifest)
        except ToolManifestError as e:
            raise to_dbus_error(e) from None
        if reserved := sorted({t.name for t in parsed.tools} & set(SYSTEM_TOOL_NAMES)):
            # a shared tool named like a system tool would receive every other app's calls of it
            raise error("InvalidArgument", f"{', '.join(reserved)}: the name of a built-in system tool")
        caller = await self.daemon.caller(sender)
        try:
            names = self.daemon.tools.register(sender, caller.app_id, path, parsed, uid=caller.uid)
        except ToolManifestError as e:
            raise to_dbus_error(e) from None
        # it left while we asked who it is: nobody serves these
        if not await name_has_owner(self.daemon.bus, sender):
            self.daemon.tools.unregister(sender)
            raise error("NotFound", "the caller left the bus")
        log.info("%s registered tools %s at %s", caller.app_id, ", ".join(names), path)
        return names

    @method()
    def UnregisterToolProvider(self, path: "o") -> "u":
        """Drop the caller's tools served at `path`; returns how many went."""
        return self.daemon.tools.unregister(current_sender(), path)

    @method()
    async def ListTools(self) -> "s":
        """The tools a run started by the caller may use, as JSON: its own, other apps' shared ones, and
        the system tools its policy allows, each system tool with whether it is available now and, if
        not, why (an absent service is reported, never faked). Each is listed under the name a run
        calls it by ("<app id>/<name>" for another app's shared tool), with the app that provides it."""
        sender = current_sender()
        caller = await self.daemon.caller(sender)
        listed = [
            {**t.spec.model_dump(), "name": t.name, "app": t.app_id, "own": t.owner == sender}
            for t in self.daemon.tools.usable_by({sender}, caller.uid)
        ]
        allowed = self.daemon.allowed_system_tools(caller.app_id)
        why = await self.daemon.system_tools.availability(allowed)
        for spec in self.daemon.system_tools.specs():
            if spec.name in allowed:
                listed.append(
                    {**spec.model_dump(), "app": SYSTEM_APP_ID, "own": False, "system": True}
                    | {"available": why[spec.name] is None}
                    | ({"unavailable": why[spec.name]} if why[spec.name] else {})
                )
        return json.dumps(listed)

    @method()
    async def Run(self, goal: "s", options: "a{sv}") -> "o":
        """Pursue `goal` with the caller's tools; returns the task object (org.llmos.Task1) whose Step
        and Result signals reach only the caller. Options: handle_token (s), max_steps (u, 1-16),
        tool_choice (s: auto|required|none), approver (o: org.llmos.ToolApprover1 on the caller's
        connection, asked before every `confirm` tool), priority (s), and the sampling options."""
        sender = current_sender()
        if not goal.strip():
            raise error("InvalidArgument", "the goal is empty")
        if len(goal) > MAX_GOAL_CHARS:
            raise error("InvalidArgument", f"the goal is over {MAX_GOAL_CHARS} characters")
        agent_name = options.pop("agent", Variant("s", DEFAULT_AGENT))
        if agent_name.signature != "s":
            raise error("InvalidArgument", "option 'agent' must be of D-Bus type 's'")
        settings = parse_run_options(options, self.daemon.config.limits)
        token = settings.request.handle_token or f"t{next(_numbers)}"
        caller = await self.daemon.caller(sender)
        try:
            self.daemon.check_system_tools(caller.app_id, settings.system_tools)
        except LlmosError as e:
            raise to_dbus_error(e) from None
        path = task_path(sender, token)
        if path in self._starting or any(o.path == path for o in self.daemon.ownership.owned_by(sender)):
            raise error("InvalidArgument", f"handle_token {token!r} is already in use by a running task")
        self._starting.add(path)  # held across the awaits below: a second Run with this token waits out
        try:
            agent = self.daemon.agents.get(agent_name.value)
            usable = await self.daemon.usable_tools(
                {sender}, caller.app_id, caller.uid, settings.system_tools
            )
            tools = agent.select_tools(usable)
            run = AgentRun(
                self.daemon, agent, goal, tools, settings, app_id=caller.app_id, uid=caller.uid, owner=sender
            )
            TaskObject(self.daemon, path, run).start()
        except LlmosError as e:
            raise to_dbus_error(e) from None
        finally:
            self._starting.discard(path)
        return path

    @method()
    def ListAgents(self) -> "s":
        """The agents this daemon offers (built-in and plugins) and plugins left out, as JSON."""
        return json.dumps(self.daemon.agents.describe())

    # -- scheduled runs ----------------------------------------------------------------------------
    @method()
    async def Schedule(self, agent: "s", goal: "s", trigger: "a{sv}", options: "a{sv}") -> "s":
        """Run `agent` on `goal` whenever `trigger` fires (cron (s) | interval (u, seconds) | date (s,
        ISO 8601), optional timezone (s)), at background priority, also across daemon restarts. The job
        belongs to the caller's app. Options: as Run's, without handle_token and approver. Returns the
        job id; each run's result is kept (GetJobResults) and sent as JobFinished to the app."""
        caller = await self.daemon.caller(current_sender())
        try:
            return self.daemon.scheduled.schedule(caller, agent, goal, trigger, options)
        except LlmosError as e:
            raise to_dbus_error(e) from None

    @method()
    async def ListJobs(self) -> "s":
        """The caller's app's scheduled jobs, as JSON."""
        caller = await self.daemon.caller(current_sender())
        return json.dumps(self.daemon.scheduled.list(caller))

    @method()
    async def GetJobResults(self, job_id: "s") -> "s":
        """The kept results of one of the caller's app's jobs (oldest first), as JSON."""
        caller = await self.daemon.caller(current_sender())
        try:
            return json.dumps(self.daemon.scheduled.results(caller, job_id))
        except LlmosError as e:
            raise to_dbus_error(e) from None

    @method()
    async def CancelJob(self, job_id: "s") -> None:
        """Remove one of the caller's app's jobs and its results."""
        caller = await self.daemon.caller(current_sender())
        try:
            self.daemon.scheduled.cancel(caller, job_id)
        except LlmosError as e:
            raise to_dbus_error(e) from None

    # Declared for introspection only: sent as unicast messages to the job's app, never broadcast.
    @signal()
    def JobFinished(self) -> "sus":
        return ["", 0, ""]
