"""An agent run followed by the client library: org.llmos.Agent1.Run, then the task's signals as events.

The pattern is the service's (dbus-api.md, org.llmos.Task1): the client picks the handle token, so it
knows the task's path and listens before calling `Run`; it takes signals only from the unique name that
answered `Run` (any connection may send a signal to any other, with any path); it stops waiting when
llmosd leaves the bus. Each signal becomes one event:

- `TextDelta(step, text)`: the answer being written (StepText). The deltas of a step add up to its answer.
- `CallStarted(step, tool)`: the model is writing a call of `tool` (StepCall).
- `ToolResult(step, tool, arguments, observation)`: a call made and what the tool answered (Step).
- `StepNote(step, text)`: work in between, e.g. one part's summary (Step with "text").
- `PartialCall(step, tool, arguments_text)`: a call cut short by a limit, never made; the run then fails
  with `CallCutError` naming it.
- `RunResult(answer, steps, cut)`: the end. A run that fails raises the named error of its Result.

Leaving the iteration early (break, an exception, the caller's task cancelled) cancels the task and waits
briefly for llmosd to confirm it, so no run is left working for nobody and the next one starts clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbus_fast import Message, MessageType, Variant

from llmos import bounded_json
from system_services.client_errors import CallCutError, ServiceError, service_error

if TYPE_CHECKING:
    from system_services.client import AsyncLLMClient

AGENT_PATH, AGENT_IFACE, TASK_IFACE = "/org/llmos/Agent1", "org.llmos.Agent1", "org.llmos.Task1"
BUS_NAME = "org.llmos.LLM1"
CANCEL_WAIT_S = 10.0  # after leaving early: how long to wait for llmosd to confirm the cancellation
MAX_STEP_CHARS = 8 * 1024 * 1024  # a Step holds a tool's whole result (llmosd bounds it at 1 MiB)
RUN_TYPES = {
    "agent": "s",
    "max_steps": "u",
    "tool_choice": "s",
    "system_tools": "as",
    "constrained": "b",
    "priority": "s",
    "max_tokens": "u",
    "temperature": "d",
    "top_k": "u",
    "top_p": "d",
    "seed": "t",
}
_tokens = itertools.count(1)


@dataclass(frozen=True)
class TextDelta:
    step: int
    text: str


@dataclass(frozen=True)
class CallStarted:
    step: int
    tool: str


@dataclass(frozen=True)
class ToolResult:
    step: int
    tool: str
    arguments: dict[str, Any]
    observation: Any


@dataclass(frozen=True)
class StepNote:
    step: int
    text: str


@dataclass(frozen=True)
class PartialCall:
    step: int
    tool: str | None
    arguments_text: str | None


@dataclass(frozen=True)
class RunResult:
    answer: str
    steps: int
    cut: bool  # the answer ran out of max_tokens: it ends with " …"


RunEvent = TextDelta | CallStarted | ToolResult | StepNote | PartialCall | RunResult


def run_options(options: dict[str, Any]) -> dict[str, Variant]:
    out = {}
    for key, value in options.items():
        if value is None:
            continue
        sig = RUN_TYPES.get(key)
        if sig is None:
            raise ValueError(f"unknown run option {key!r} (known: {', '.join(sorted(RUN_TYPES))})")
        out[key] = Variant(sig, list(value) if sig == "as" else value)
    return out


def new_token() -> str:
    """A handle token unique among this connection's runs."""
    return f"r{next(_tokens)}_{secrets.token_hex(4)}"


def _owner_watch(name: str) -> str:
    return (
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
        f"member='NameOwnerChanged',arg0='{name}'"
    )


async def follow_run(client: AsyncLLMClient, goal: str, options: dict[str, Any]) -> AsyncIterator[RunEvent]:
    """Start a run and yield its events until its result (see the module's docstring)."""
    bus = client.bus
    token = new_token()
    path = f"{AGENT_PATH}/task/{bus.unique_name.lstrip(':').replace('.', '_')}/{token}"
    queue: asyncio.Queue[Message] = asyncio.Queue()
    daemon: list[str] = []  # llmosd's unique name, once Run answered

    def on_message(msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return None
        ours = msg.path == path and msg.interface == TASK_IFACE
        if ours or (msg.sender == "org.freedesktop.DBus" and msg.member == "NameOwnerChanged"):
            queue.put_nowait(msg)
        return None

    variants = {**run_options(options), "handle_token": Variant("s", token)}
    bus.add_message_handler(on_message)  # before Run: no signal can slip by
    finished = False
    try:
        await client.driver("AddMatch", _owner_watch(BUS_NAME))
        reply = await client.call_reply(AGENT_PATH, AGENT_IFACE, "Run", "sa{sv}", [goal, variants])
        daemon.append(reply.sender)
        partial: PartialCall | None = None
        while True:
            msg = await queue.get()
            if msg.member == "NameOwnerChanged":
                if msg.body[1] == daemon[0] and not msg.body[2]:
                    finished = True  # nothing left to cancel
                    gone = "org.freedesktop.DBus.Error.Disconnected"
                    raise ServiceError(gone, "llmosd left during the run")
                continue
            if msg.sender != daemon[0]:  # not from llmosd: forged by another connection
                continue
            event = _event(msg)
            if isinstance(event, PartialCall):
                partial = event
            if msg.member == "Result":
                finished = True
                code, results = msg.body
                values = {k: v.value for k, v in results.items()}
                if code == 0:
                    answer, steps = values.get("answer", ""), values.get("steps", 0)
                    yield RunResult(answer, steps, values.get("cut", False))
                    return
                name = values.get("error_name", "org.llmos.Error.Failed")
                message = values.get("error_message", "the run failed")
                if partial is not None and values.get("cut"):
                    raise CallCutError(name, message, partial.tool, partial.arguments_text)
                raise service_error(name, message)
            if event is not None:
                yield event
    finally:
        if daemon and not finished:
            await _cancel(client, path, queue, daemon[0])
        bus.remove_message_handler(on_message)
        with contextlib.suppress(Exception):
            await client.driver("RemoveMatch", _owner_watch(BUS_NAME))


def _event(msg: Message) -> RunEvent | None:
    """One of llmosd's task signals as an event (None: one this library does not know, or a Result)."""
    if msg.member == "StepText" and msg.signature == "us":
        return TextDelta(msg.body[0], msg.body[1])
    if msg.member == "StepCall" and msg.signature == "us":
        return CallStarted(msg.body[0], msg.body[1])
    if msg.member != "Step" or msg.signature != "s":
        return None
    step = bounded_json.loads(msg.body[0], "a step", max_chars=MAX_STEP_CHARS)
    n = step.get("step", 0)
    if step.get("cut") and "partial" in step:
        return PartialCall(n, step.get("tool"), step.get("arguments_text"))
    if step.get("tool") is not None:
        return ToolResult(n, step["tool"], step.get("arguments") or {}, step.get("observation"))
    if "text" in step:
        return StepNote(n, step["text"] or "")
    return None  # the answer: it comes whole with the Result


async def _cancel(client: AsyncLLMClient, path: str, queue: asyncio.Queue[Message], daemon: str) -> None:
    """Cancel the task and wait (bounded) for its Result, so the run is over when the caller goes on."""
    try:
        async with asyncio.timeout(CANCEL_WAIT_S):
            await client.call(path, TASK_IFACE, "Cancel")
            while True:
                msg = await queue.get()
                if msg.sender == daemon and msg.member == "Result" and msg.path == path:
                    return
    except (ServiceError, TimeoutError, OSError, EOFError):
        return  # already finished (NotFound), or llmosd is gone: nothing is left running for us
