"""An agent run: /org/llmos/Agent1/task/<sender>/<handle_token>, org.llmos.Task1, owned by its caller.

Shaped like a Request (request_object.py): the caller picks `handle_token`, so it can subscribe before
the first step; every `Step`, the text of steps as they are written (`StepText`, `StepCall`:
step_stream.py) and the final `Result` are unicast to the owner only; the object goes away after
`Result`, or when the owner leaves the bus (the run is cancelled then).
"""

import asyncio
import contextlib
import logging
from typing import Any

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from agents.agent_loop import Step as AgentStep
from llmos.log_limit import LimitedLog
from system_services.agent_run import AgentRun
from system_services.ownership import Ownership
from system_services.request_object import send_unicast
from system_services.step_stream import StepStream

IFACE = "org.llmos.Task1"
VERSION = 2  # 2: StepText and StepCall, a step's text as the model writes it
log = logging.getLogger("llmosd")
_limited = LimitedLog(log)  # one per run, and a caller can start runs in a loop


def task_path(sender: str, token: str) -> str:
    return f"/org/llmos/Agent1/task/{sender.lstrip(':').replace('.', '_')}/{token}"


class TaskObject(ServiceInterface):
    def __init__(self, daemon: Any, path: str, run: AgentRun) -> None:
        super().__init__(IFACE)
        assert run.owner is not None
        self.daemon, self.path, self.run, self.owner = daemon, path, run, run.owner
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

    @signal()
    def StepText(self) -> "us":
        """(step, delta): the answer of step `step` grows by `delta` (batched, ~20 a second at most)."""
        return [0, ""]

    @signal()
    def StepCall(self) -> "us":
        """(step, tool): step `step` is writing a call of `tool`; its Step follows once the call is made."""
        return [0, ""]

    # -- the run -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            stream = StepStream(self._unicast, self.daemon.tool_format)
            outcome = await self.run.execute(lambda step: self._step(stream, step), stream)
            self._unicast("Result", "ua{sv}", [outcome.code, outcome.variants()])
        except Exception as e:  # the Result could not be sent: logged; the object goes all the same
            _limited.failed("agent task results", f"{self.path}: {e}", exc_info=True)
        finally:
            self._teardown()

    def _step(self, stream: StepStream, step: AgentStep) -> None:
        stream.settle(step)  # the answer's StepText deltas add up to it before its Step
        self._unicast("Step", "s", [step.to_json()])

    # -- plumbing ----------------------------------------------------------------------------------
    def _unicast(self, member: str, signature: str, body: list[Any]) -> None:
        if not self._closed:
            send_unicast(self.daemon.bus, self.owner, self.path, IFACE, member, signature, body)

    def _cancel(self, why: str) -> None:
        self.run.cancel_generation(why)
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
