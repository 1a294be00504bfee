"""An agent run: /org/llmos/Agent1/task/<sender>/<handle_token>, org.llmos.Task1, owned by its caller.

Shaped like a Request (request_object.py): the caller picks `handle_token`, so it can subscribe before
the first step; every `Step` and the final `Result` are unicast to the owner only; the object goes away
after `Result`, or when the owner leaves the bus (the run is cancelled then).
"""

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from agents.agent_loop import InvalidStepError, run_agent
from agents.tools import Tool
from system_services.dbus_errors import to_dbus_error
from system_services.engine_worker import CancelledByDaemon, Job
from system_services.ownership import Ownership
from system_services.request_object import send_unicast

IFACE = "org.llmos.Task1"
VERSION = 1
RESULT_OK, RESULT_CANCELLED, RESULT_FAILED = 0, 1, 2
TOOL_TIMEOUT_S = 20.0
APPROVE_TIMEOUT_S = 120.0
log = logging.getLogger("llmosd")


def task_path(sender: str, token: str) -> str:
    return f"/org/llmos/Agent1/task/{sender.lstrip(':').replace('.', '_')}/{token}"


class TaskObject(ServiceInterface):
    def __init__(
        self,
        daemon: Any,
        owner: str,
        app_id: str,
        path: str,
        goal: str,
        tools: list[Tool],
        options: dict[str, Any],
    ) -> None:
        super().__init__(IFACE)
        self.daemon, self.owner, self.app_id, self.path = daemon, owner, app_id, path
        self.goal, self.tools, self.options = goal, tools, options
        self._job: Job | None = None  # the generation in flight, cancelled with the run
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self.daemon.bus.export(self.path, self)
        self.daemon.ownership.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- D-Bus -------------------------------------------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "u":
        Ownership.check(self)
        return VERSION

    @method()
    def Cancel(self) -> None:
        """Stop the run; a Result with code 1 follows."""
        Ownership.check(self)
        self._cancel("cancelled by its owner")

    # Declared for introspection only: sent as unicast messages, never broadcast.
    @signal()
    def Step(self) -> "s":
        return ""

    @signal()
    def Result(self) -> "ua{sv}":
        return [0, {}]

    # -- the run -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        steps = 0
        try:
            async for step in run_agent(
                self.goal,
                self.tools,
                self._generate,
                self._call_tool,
                max_steps=self.options["max_steps"],
                tool_choice=self.options["tool_choice"],
                constrained=self.options.get("constrained", True),
                max_step_tokens=self.options["request"].params.max_tokens,
            ):
                steps += 1
                self._unicast("Step", "s", [step.to_json()])
                if step.answer is not None:
                    self._finish(
                        RESULT_OK, {"answer": Variant("s", step.answer), "steps": Variant("u", steps)}
                    )
                    return
            self._finish(RESULT_FAILED, _error("org.llmos.Error.Failed", "the run ended without an answer"))
        except InvalidStepError as e:
            self._finish(RESULT_FAILED, _error("org.llmos.Error.InvalidToolCall", str(e)))
        except (asyncio.CancelledError, CancelledByDaemon) as e:
            self._finish(RESULT_CANCELLED, _error("org.llmos.Error.Cancelled", str(e) or "cancelled"))
        except Exception as e:
            err = to_dbus_error(e)
            self._finish(RESULT_FAILED, _error(err.type, err.text))

    async def _generate(self, messages: list[dict[str, str]], schema: str | None) -> str:
        d = self.daemon
        job = d.job(messages, replace(self.options["request"], json_schema=schema), self.app_id)
        self._job = job
        try:
            result = await d.run_for_caller(job, self.owner)
        finally:
            self._job = None
        return result.text

    async def _call_tool(self, tool: Tool, arguments: dict[str, Any]) -> Any:
        """The provider's answer, or {"error": ...}: a failing or silent tool is something the model
        reads, never the end of the run."""
        if tool.spec.confirm and not await self._approved(tool, arguments):
            return {"error": "the user did not approve this call"}
        call = ("org.llmos.ToolProvider1", "Call", [tool.spec.name, json.dumps(arguments)])
        try:
            reply = await self._call_app(tool.owner, tool.path, *call, TOOL_TIMEOUT_S)
        except TimeoutError:
            return {"error": f"the tool did not answer within {TOOL_TIMEOUT_S:.0f} s"}
        if reply is None or reply.message_type == MessageType.ERROR:
            why = reply.body[0] if reply is not None and reply.body else ""
            name = reply.error_name if reply is not None else "no reply"
            return {"error": f"{name}: {why}".rstrip(": ")}
        text = reply.body[0] if reply.body else ""
        try:
            return json.loads(text)
        except (json.JSONDecodeError, TypeError):
            return {"result": str(text)}  # not JSON: passed on as a string, marked as such

    async def _approved(self, tool: Tool, arguments: dict[str, Any]) -> bool:
        approver = self.options.get("approver")
        if not approver:
            return False
        call = ("org.llmos.ToolApprover1", "Approve", [tool.spec.name, json.dumps(arguments)])
        try:
            reply = await self._call_app(self.owner, approver, *call, APPROVE_TIMEOUT_S)
        except TimeoutError:
            return False
        return bool(
            reply is not None and reply.message_type == MessageType.METHOD_RETURN and reply.body == [True]
        )

    # -- plumbing ----------------------------------------------------------------------------------
    async def _call_app(
        self, dest: str, path: str, iface: str, member: str, body: list[str], timeout: float
    ) -> Message | None:
        """A method call into an app (`ss` arguments), bounded: dbus-fast has no call timeout."""
        msg = Message(destination=dest, path=path, interface=iface, member=member, signature="ss", body=body)
        return await asyncio.wait_for(self.daemon.bus.call(msg), timeout)

    def _unicast(self, member: str, signature: str, body: list[Any]) -> None:
        if not self._closed:
            send_unicast(self.daemon.bus, self.owner, self.path, IFACE, member, signature, body)

    def _finish(self, code: int, results: dict[str, Variant]) -> None:
        self._unicast("Result", "ua{sv}", [code, results])
        self._teardown()

    def _cancel(self, why: str) -> None:
        if self._job is not None:
            self.daemon.worker.cancel(self._job, why)
        if self._task is not None and not self._task.done():
            self._task.cancel(why)

    def close(self, why: str, owner_gone: bool = True) -> None:
        if owner_gone:
            self._closed = True  # nobody to tell
        self._cancel(why)

    def _teardown(self) -> None:
        self._closed = True
        self.daemon.ownership.remove(self)
        with contextlib.suppress(Exception):
            self.daemon.bus.unexport(self.path, self)


def _error(name: str, message: str) -> dict[str, Variant]:
    return {"error_name": Variant("s", name), "error_message": Variant("s", message)}
