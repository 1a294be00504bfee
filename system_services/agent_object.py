"""The agent layer's front object: /org/llmos/Agent1, org.llmos.Agent1.

Apps register tool providers (an object implementing org.llmos.ToolProvider1 on their own connection,
plus a manifest of tools) and start runs: a goal the model pursues by calling the tools the caller may
use (its own, and other apps' shared ones). A provider's tools go away with its connection.
"""

import itertools
import json
import logging
from typing import Any

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from agents.tools import ToolManifest, ToolManifestError
from system_services.caller import current_sender
from system_services.dbus_errors import error, to_dbus_error
from system_services.options import parse_options
from system_services.task_object import TaskObject, task_path

IFACE = "org.llmos.Agent1"
PATH = "/org/llmos/Agent1"
VERSION = 1
MAX_STEPS = 16
_numbers = itertools.count(1)
log = logging.getLogger("llmosd")
RUN_KEYS = {"handle_token": "s", "max_steps": "u", "tool_choice": "s", "approver": "o", "constrained": "b"}


class AgentObject(ServiceInterface):
    def __init__(self, daemon: Any) -> None:
        super().__init__(IFACE)
        self.daemon = daemon

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
        caller = await self.daemon.caller(sender)
        names = self.daemon.tools.register(sender, caller.app_id, path, parsed)
        log.info("%s registered tools %s at %s", caller.app_id, ", ".join(names), path)
        return names

    @method()
    def UnregisterToolProvider(self, path: "o") -> "u":
        """Drop the caller's tools served at `path`; returns how many went."""
        return self.daemon.tools.unregister(current_sender(), path)

    @method()
    def ListTools(self) -> "s":
        """The tools a run started by the caller may use, as JSON."""
        sender = current_sender()
        return json.dumps(
            [{**t.spec.model_dump(), "own": t.owner == sender} for t in self.daemon.tools.usable_by(sender)]
        )

    @method()
    async def Run(self, goal: "s", options: "a{sv}") -> "o":
        """Pursue `goal` with the caller's tools; returns the task object (org.llmos.Task1) whose Step
        and Result signals reach only the caller. Options: handle_token (s), max_steps (u, 1-16),
        tool_choice (s: auto|required|none), approver (o: org.llmos.ToolApprover1 on the caller's
        connection, asked before every `confirm` tool), priority (s), and the sampling options."""
        sender = current_sender()
        if not goal.strip():
            raise error("InvalidArgument", "the goal is empty")
        own = {k: options.pop(k) for k in list(options) if k in RUN_KEYS}
        for key, var in own.items():
            if var.signature != RUN_KEYS[key]:
                raise error("InvalidArgument", f"option {key!r} must be of D-Bus type {RUN_KEYS[key]!r}")
        limits = self.daemon.config.limits
        opts = parse_options(
            options,
            default_max_tokens=limits.default_max_tokens,
            max_tokens_limit=limits.max_tokens,
            allowed=frozenset({"temperature", "top_k", "top_p", "seed", "max_tokens", "priority"}),
        )
        max_steps = own["max_steps"].value if "max_steps" in own else 6
        if not 1 <= max_steps <= MAX_STEPS:
            raise error("InvalidArgument", f"max_steps must be 1 to {MAX_STEPS}")
        tool_choice = own["tool_choice"].value if "tool_choice" in own else "auto"
        if tool_choice not in ("auto", "required", "none"):
            raise error("InvalidArgument", "tool_choice must be auto, required or none")
        token = own["handle_token"].value if "handle_token" in own else f"t{next(_numbers)}"
        if not (0 < len(token) <= 64 and all(c.isascii() and (c.isalnum() or c == "_") for c in token)):
            raise error("InvalidArgument", "handle_token must be 1-64 characters of A-Z, a-z, 0-9 and _")
        path = task_path(sender, token)
        if any(o.path == path for o in self.daemon.ownership.owned_by(sender)):
            raise error("InvalidArgument", f"handle_token {token!r} is already in use by a running task")
        caller = await self.daemon.caller(sender)
        task = TaskObject(
            self.daemon,
            sender,
            caller.app_id,
            path,
            goal,
            self.daemon.tools.usable_by(sender),
            {
                "request": opts,  # sampling and priority of every step (each adds its step's schema)
                "max_steps": max_steps,
                "tool_choice": tool_choice,
                "approver": own["approver"].value if "approver" in own else None,
                # false only to measure what constrained decoding buys (bench/agents.py)
                "constrained": own["constrained"].value if "constrained" in own else True,
            },
        )
        task.start()
        return path
