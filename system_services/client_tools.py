"""An app's tools, served by the client library: typed Python functions registered with llmosd's
org.llmos.Agent1 and called through org.llmos.ToolProvider1.Call on the app's own connection.

The client answers `Call` itself (a message handler, not an exported interface, so it sees who calls):
only llmosd may call, since any connection on the bus could otherwise make the app run its tools with
made-up arguments. The arguments are checked again here, bounded, against the function's signature (the
daemon already holds them to the tool's strict schema; this is the app's own guard). A sync function runs
on a thread, so a slow tool never stalls the connection; an async one is awaited. What the function
returns is sent back as JSON; what it raises becomes an error reply the model reads as
{"error": "..."} (its message cut at MAX_ERROR_CHARS), and the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dbus_fast import Message, MessageType

from llmos import bounded_json
from system_services.tool_schema import tool_entry

if TYPE_CHECKING:
    from system_services.client import AsyncLLMClient

PROVIDER_IFACE = "org.llmos.ToolProvider1"
AGENT_PATH, AGENT_IFACE = "/org/llmos/Agent1", "org.llmos.Agent1"
MAX_ARGUMENT_CHARS = 1024 * 1024  # what the daemon may send (its own bound on results, the same size)
MAX_RESULT_CHARS = 1024 * 1024  # what the daemon reads of a result; more is refused here, said so
MAX_ERROR_CHARS = 1000  # the daemon cuts an error reply's message there too
FAILED = "org.llmos.Error.Failed"
log = logging.getLogger("llmos.client")


class ToolError(Exception):
    """Raise it from a tool to give the model a message meant for it ("no such contact: Bob"), without
    the exception's type in front."""


class ToolProvider:
    """Tools served at `path` on the client's connection, registered with llmosd until `unregister` or
    the connection closes (llmosd drops a provider's tools when it leaves the bus)."""

    def __init__(self, client: AsyncLLMClient, path: str, functions: Sequence[Callable[..., Any]]) -> None:
        self.client, self.path = client, path
        entries = [tool_entry(fn) for fn in functions]
        names = [e["name"] for e in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"two tools are named the same: {', '.join(sorted(names))}")
        self.entries = entries
        self.functions = dict(zip(names, functions, strict=True))
        self.names: list[str] = []  # as llmosd registered them
        self._daemon: str | None = None  # llmosd's unique name: the only caller answered
        self._calls: set[asyncio.Task[None]] = set()

    def manifest(self, *, shared: bool = False) -> str:
        tools = [{**e, "shared": True} if shared else e for e in self.entries]
        return json.dumps({"tools": tools})

    async def register(self, *, shared: bool = False) -> list[str]:
        self.client.bus.add_message_handler(self._on_message)  # before llmosd can call
        try:
            body = [self.path, self.manifest(shared=shared)]
            reply = await self.client.call_reply(AGENT_PATH, AGENT_IFACE, "RegisterToolProvider", "os", body)
        except BaseException:
            self.client.bus.remove_message_handler(self._on_message)
            raise
        self._daemon = reply.sender
        self.names = list(reply.body[0])
        return self.names

    async def unregister(self) -> None:
        """Take the tools back; calls still running are cancelled (llmosd gets an error reply for each)."""
        try:
            await self.client.call(AGENT_PATH, AGENT_IFACE, "UnregisterToolProvider", "o", [self.path])
        finally:
            self.client.bus.remove_message_handler(self._on_message)
            for task in list(self._calls):
                task.cancel()

    # -- answering llmosd ---------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> Any:
        if msg.message_type != MessageType.METHOD_CALL or msg.path != self.path:
            return None
        if msg.interface not in (PROVIDER_IFACE, None) or msg.member != "Call":
            return None
        if self._daemon is None or msg.sender != self._daemon:  # only llmosd runs this app's tools
            return Message.new_error(msg, "org.freedesktop.DBus.Error.AccessDenied", "only llmosd may call")
        if msg.signature != "ss":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "Call takes (s, s)")
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return True  # answered by the task

    async def _answer(self, msg: Message) -> None:
        name, arguments = msg.body
        try:
            result = await self.call(name, arguments)
            reply = Message.new_method_return(msg, "s", [result])
        except asyncio.CancelledError:
            reply = Message.new_error(msg, FAILED, "the app took its tools back during the call")
        except ToolError as e:
            reply = Message.new_error(msg, FAILED, _cut(str(e)))
        except Exception as e:  # the tool's own failure: the model reads it, the run goes on
            log.warning("tool %s failed: %s: %s", name, type(e).__name__, e)
            reply = Message.new_error(msg, FAILED, _cut(f"{type(e).__name__}: {e}"))
        with contextlib.suppress(Exception):  # the connection closed meanwhile: nobody to answer
            await self.client.bus.send(reply)

    async def call(self, name: str, arguments_json: str) -> str:
        """Run tool `name` with its JSON arguments; its result as JSON text."""
        fn = self.functions.get(name)
        if fn is None:
            raise ToolError(f"this app has no tool {name!r}")
        arguments = bounded_json.loads(arguments_json, "the arguments", max_chars=MAX_ARGUMENT_CHARS)
        if not isinstance(arguments, dict):
            raise ToolError("the arguments are not a JSON object")
        entry = next(e for e in self.entries if e["name"] == name)["parameters"]
        if unknown := sorted(set(arguments) - set(entry["properties"])):
            raise ToolError(f"{name} has no parameter {', '.join(unknown)}")
        if missing := [p for p in entry.get("required", ()) if p not in arguments]:
            raise ToolError(f"{name} needs {', '.join(missing)}")
        for key, value in arguments.items():  # JSON has one kind of number: a float parameter gets a float
            if entry["properties"][key].get("type") == "number" and type(value) is int:
                arguments[key] = float(value)
        if inspect.iscoroutinefunction(fn):
            result = await fn(**arguments)
        else:
            result = await asyncio.to_thread(fn, **arguments)
        text = json.dumps(result, ensure_ascii=False, default=str)
        if len(text) > MAX_RESULT_CHARS:
            raise ToolError(f"the result is over {MAX_RESULT_CHARS} characters")
        return text


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
