"""Client library for apps: talk to llmosd over D-Bus, async or blocking.

    from system_services.client import LLMClient, TextDelta, RunResult
    with LLMClient.connect() as llm:                    # system bus, or session=True / address=...
        print(llm.generate("Hello", max_tokens=32).text)
        chat = llm.create_session(system_prompt="Be brief.")
        for piece in chat.stream("Tell me a joke"):       # only this process receives the chunks
            print(piece, end="", flush=True)
        llm.register_tools([get_weather])                 # typed functions with docstrings: tool_schema.py
        for event in llm.run("Weather in Oslo?"):         # a run's events as they happen: client_run.py
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)

Errors from the service arrive as `ServiceError` subclasses named after the D-Bus error
(`NotFoundError` for org.llmos.Error.NotFound, ...: client_errors.py), with its message. Streaming
follows the service's request pattern: the client picks the handle token, subscribes to its request path,
then calls PromptStream (or Agent1.Run), so no chunk can be missed.

Signals are taken only from llmosd itself: the unique name that answered the call that started the
stream (the owner of org.llmos.LLM1). The bus lets any connection send a signal to any other, and a
request's path can be guessed, so without this check another local user could feed an app forged text.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from system_services.bus_driver import driver_call
from system_services.client_errors import (
    AccessDeniedError,
    BusyError,
    CallCutError,
    ContextOverflowError,
    FailedError,
    InvalidArgumentError,
    ModelUnavailableError,
    NotFoundError,
    QuotaExceededError,
    RequestCancelledError,
    ServiceError,
    service_error,
)
from system_services.client_run import (
    AGENT_IFACE,
    AGENT_PATH,
    CallStarted,
    PartialCall,
    RunEvent,
    RunResult,
    StepNote,
    TextDelta,
    ToolResult,
    follow_run,
)
from system_services.client_tools import ToolError, ToolProvider
from system_services.tool_schema import ToolDefinitionError, tool_entry

BUS_NAME, PATH = "org.llmos.LLM1", "/org/llmos/LLM1"
LLM_IFACE, SESSION_IFACE, REQUEST_IFACE = "org.llmos.LLM1", "org.llmos.Session1", "org.llmos.Request1"
_TYPES = {
    "max_tokens": "u",
    "top_k": "u",
    "seed": "t",
    "temperature": "d",
    "top_p": "d",
    "repetition_penalty": "d",
    "stop": "as",
    "system_prompt": "s",
    "handle_token": "s",
    "priority": "s",
    "ignore_eos": "b",
    "json_schema": "s",  # JSON text; the answer is JSON valid against it
}
_tokens = itertools.count(1)


@dataclass(frozen=True)
class Answer:
    text: str
    stats: dict[str, Any]  # finish_reason, tokens_in, tokens_out, ttft_ms, tokens_per_s


def to_options(options: dict[str, Any]) -> dict[str, Variant]:
    out = {}
    for key, value in options.items():
        if value is None:
            continue
        sig = _TYPES.get(key)
        if sig is None:
            raise ValueError(f"unknown option {key!r} (known: {', '.join(sorted(_TYPES))})")
        out[key] = Variant(sig, list(value) if sig == "as" else value)
    return out


def _plain(results: dict[str, Variant]) -> dict[str, Any]:
    return {k: _unwrap(v) for k, v in results.items()}


def _unwrap(v: Any) -> Any:
    """Variants inside variants (GetStatus's per-app table) as plain Python values."""
    if isinstance(v, Variant):
        return _unwrap(v.value)
    if isinstance(v, dict):
        return {k: _unwrap(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unwrap(x) for x in v]
    return v


class AsyncLLMClient:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, *, address: str | None = None, session: bool = False) -> AsyncLLMClient:
        bus_type = BusType.SESSION if session else BusType.SYSTEM
        try:
            bus = await MessageBus(bus_type=bus_type, bus_address=address).connect()
        except (OSError, ValueError) as e:
            where = address or ("the session bus" if session else "the system bus")
            raise ServiceError(
                "org.freedesktop.DBus.Error.NoServer", f"cannot connect to {where}: {e}"
            ) from None
        return cls(bus)

    def close(self) -> None:
        self.bus.disconnect()

    async def call(
        self, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None
    ) -> Any:
        return (await self.call_reply(path, iface, member, sig, body)).body

    async def call_reply(
        self, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None
    ) -> Message:
        """The whole reply: its `sender` is llmosd's unique name, the only sender whose signals count."""
        msg = Message(
            destination=BUS_NAME, path=path, interface=iface, member=member, signature=sig, body=body or []
        )
        try:
            reply = await self.bus.call(msg)
        except (OSError, EOFError) as e:  # the bus itself went away (dbus-daemon stopped or restarted)
            raise ServiceError("org.freedesktop.DBus.Error.Disconnected", f"lost the bus: {e}") from None
        if reply.message_type == MessageType.ERROR:
            raise service_error(reply.error_name or "unknown", reply.body[0] if reply.body else "")
        return reply

    async def driver(self, member: str, rule: str) -> None:
        """A call to the bus itself taking one string (AddMatch, RemoveMatch)."""
        try:
            reply = await self.bus.call(driver_call(member, "s", [rule]))
        except (OSError, EOFError) as e:
            raise ServiceError("org.freedesktop.DBus.Error.Disconnected", f"lost the bus: {e}") from None
        if reply is not None and reply.message_type == MessageType.ERROR:
            raise ServiceError(reply.error_name or "unknown", reply.body[0] if reply.body else "")

    async def status(self) -> dict[str, Any]:
        (st,) = await self.call(PATH, LLM_IFACE, "GetStatus")
        return _plain(st)

    async def count_tokens(self, text: str) -> int:
        (n,) = await self.call(PATH, LLM_IFACE, "CountTokens", "s", [text])
        return int(n)

    async def generate(self, prompt: str, **options: Any) -> Answer:
        text, stats = await self.call(PATH, LLM_IFACE, "Generate", "sa{sv}", [prompt, to_options(options)])
        return Answer(text, _plain(stats))

    async def create_session(self, system_prompt: str | None = None) -> AsyncSession:
        (path,) = await self.call(
            PATH, LLM_IFACE, "CreateSession", "a{sv}", [to_options({"system_prompt": system_prompt})]
        )
        return AsyncSession(self, path)

    # -- agents (org.llmos.Agent1) -------------------------------------------------------------------
    async def register_tools(
        self, functions: Sequence[Callable[..., Any]], *, shared: bool = False, path: str | None = None
    ) -> ToolProvider:
        """Offer typed Python functions as tools to this app's runs (and, `shared`, to the same user's
        other apps' runs): their schemas come from their type hints and docstrings (tool_schema.py);
        this connection answers the calls, sync functions on a thread. Registering a name again replaces
        it. The tools go when `unregister` is awaited or this client closes."""
        where = path or f"/org/llmos/client/tools{next(_tokens)}"
        provider = ToolProvider(self, where, functions)
        await provider.register(shared=shared)
        return provider

    def run(self, goal: str, **options: Any) -> AsyncIterator[RunEvent]:
        """Start an agent run and yield its events as they happen: TextDelta, CallStarted, ToolResult,
        StepNote, PartialCall, then RunResult. Options: agent, max_steps, tool_choice, system_tools,
        max_tokens, temperature, ... (dbus-api.md, Run). A failed run raises its named error
        (CallCutError for a call cut short). Leaving early cancels the run; use
        `contextlib.aclosing(client.run(...))` to have that happen at once rather than when the
        iterator is collected."""
        return follow_run(self, goal, options)

    async def list_tools(self) -> list[dict[str, Any]]:
        """The tools a run started by this client may use (its own, shared ones, system tools)."""
        (text,) = await self.call(AGENT_PATH, AGENT_IFACE, "ListTools")
        return json.loads(text)

    async def list_agents(self) -> dict[str, Any]:
        (text,) = await self.call(AGENT_PATH, AGENT_IFACE, "ListAgents")
        return json.loads(text)


class AsyncSession:
    def __init__(self, client: AsyncLLMClient, path: str) -> None:
        self.client, self.path = client, path
        self.last_stats: dict[str, Any] = {}

    async def prompt(self, text: str, **options: Any) -> Answer:
        answer, stats = await self.client.call(
            self.path, SESSION_IFACE, "Prompt", "sa{sv}", [text, to_options(options)]
        )
        self.last_stats = _plain(stats)
        return Answer(answer, self.last_stats)

    async def stream(self, text: str, **options: Any) -> AsyncIterator[str]:
        """Yield text as it is generated; `last_stats` holds the final stats afterwards.

        Leaving early (a `break`, an exception, cancellation) cancels the request on llmosd and waits
        for its `Response`, so the session is free again for the next prompt rather than `Busy` with an
        answer no one reads."""
        bus = self.client.bus
        token = f"c{next(_tokens)}_{secrets.token_hex(4)}"
        path = f"/org/llmos/LLM1/request/{bus.unique_name.lstrip(':').replace('.', '_')}/{token}"
        queue: asyncio.Queue[Message] = asyncio.Queue()

        def on_message(msg: Message) -> None:
            if msg.message_type == MessageType.SIGNAL and msg.path == path and msg.interface == REQUEST_IFACE:
                queue.put_nowait(msg)
            return None

        bus.add_message_handler(on_message)  # before the call: no chunk can slip by
        reply: Message | None = None
        finished = False
        try:
            reply = await self.client.call_reply(
                self.path,
                SESSION_IFACE,
                "PromptStream",
                "sa{sv}",
                [text, to_options({**options, "handle_token": token})],
            )
            while True:
                msg = await queue.get()
                if msg.sender != reply.sender:  # not from llmosd: forged by another connection
                    continue
                member, body = msg.member, msg.body
                if member == "Chunk":
                    yield body[0]
                elif member == "Response":
                    finished = True
                    code, results = body
                    self.last_stats = _plain(results)
                    if code != 0:
                        raise service_error(
                            self.last_stats.get("error_name", "org.llmos.Error.Failed"),
                            self.last_stats.get("error_message", "the request failed"),
                        )
                    return
        finally:
            try:
                if reply is not None and not finished:
                    await asyncio.shield(self._cancel(path, queue, reply.sender))
            finally:
                bus.remove_message_handler(on_message)

    async def _cancel(self, path: str, queue: asyncio.Queue[Message], daemon: str | None) -> None:
        """Cancel an unfinished streamed request and wait (briefly) for its Response."""
        with contextlib.suppress(ServiceError):
            await self.client.call(path, REQUEST_IFACE, "Cancel")
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(5):
                while True:
                    msg = await queue.get()
                    if msg.sender == daemon and msg.member == "Response":
                        self.last_stats = _plain(msg.body[1])
                        return

    async def clone(self) -> AsyncSession:
        (path,) = await self.client.call(self.path, SESSION_IFACE, "Clone")
        return AsyncSession(self.client, path)

    async def close(self) -> None:
        await self.client.call(self.path, SESSION_IFACE, "Close")


class LLMClient:
    """The blocking face of AsyncLLMClient, on a private event loop (not thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inner: AsyncLLMClient) -> None:
        self._loop, self._inner = loop, inner

    @classmethod
    def connect(cls, *, address: str | None = None, session: bool = False) -> LLMClient:
        loop = asyncio.new_event_loop()
        try:
            inner = loop.run_until_complete(AsyncLLMClient.connect(address=address, session=session))
        except BaseException:
            loop.close()
            raise
        return cls(loop, inner)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    @property
    def aio(self) -> AsyncLLMClient:
        """The asyncio client underneath, for interfaces this blocking face does not wrap (Agent1)."""
        return self._inner

    def run_coroutine(self, coro: Any) -> Any:
        """Run a coroutine of `aio` on this client's event loop and return its result."""
        return self._run(coro)

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._inner.close()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    def status(self) -> dict[str, Any]:
        return self._run(self._inner.status())

    def count_tokens(self, text: str) -> int:
        return self._run(self._inner.count_tokens(text))

    def generate(self, prompt: str, **options: Any) -> Answer:
        return self._run(self._inner.generate(prompt, **options))

    def create_session(self, system_prompt: str | None = None) -> Session:
        return Session(self, self._run(self._inner.create_session(system_prompt)))

    def register_tools(
        self, functions: Sequence[Callable[..., Any]], *, shared: bool = False, path: str | None = None
    ) -> Tools:
        """As AsyncLLMClient.register_tools. The calls are answered while this client's event loop runs:
        during `run()` (or any other call), which is when a run calls them."""
        return Tools(self, self._run(self._inner.register_tools(functions, shared=shared, path=path)))

    def run(self, goal: str, **options: Any) -> Iterator[RunEvent]:
        """As AsyncLLMClient.run; breaking out of the loop cancels the run before it returns."""
        agen = self._inner.run(goal, **options)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def list_tools(self) -> list[dict[str, Any]]:
        return self._run(self._inner.list_tools())

    def list_agents(self) -> dict[str, Any]:
        return self._run(self._inner.list_agents())


class Tools:
    """Tools registered through a blocking LLMClient."""

    def __init__(self, client: LLMClient, provider: ToolProvider) -> None:
        self._client, self.provider = client, provider

    @property
    def names(self) -> list[str]:
        return self.provider.names

    def unregister(self) -> None:
        self._client._run(self.provider.unregister())


class Session:
    def __init__(self, client: LLMClient, inner: AsyncSession) -> None:
        self._client, self._inner = client, inner

    @property
    def path(self) -> str:
        return self._inner.path

    @property
    def last_stats(self) -> dict[str, Any]:
        return self._inner.last_stats

    def prompt(self, text: str, **options: Any) -> Answer:
        return self._client._run(self._inner.prompt(text, **options))

    def stream(self, text: str, **options: Any) -> Iterator[str]:
        """Text as it is generated. Ctrl-C (KeyboardInterrupt) or leaving the loop early cancels the
        request: the pending step is cancelled first, so the stream closes cleanly (cancelling on
        llmosd) instead of failing with "asynchronous generator is already running"."""
        loop = self._client._loop
        agen = self._inner.stream(text, **options)
        try:
            while True:
                step = loop.create_task(agen.__anext__())
                try:
                    yield loop.run_until_complete(step)
                except StopAsyncIteration:
                    return
                except BaseException:
                    if not step.done():  # interrupted while waiting: cancel inside the generator
                        step.cancel()
                        with contextlib.suppress(BaseException):
                            loop.run_until_complete(step)
                    raise
        finally:
            loop.run_until_complete(agen.aclose())

    def clone(self) -> Session:
        return Session(self._client, self._client._run(self._inner.clone()))

    def close(self) -> None:
        self._client._run(self._inner.close())


__all__ = [
    "AccessDeniedError",
    "Answer",
    "AsyncLLMClient",
    "AsyncSession",
    "BusyError",
    "CallCutError",
    "CallStarted",
    "ContextOverflowError",
    "FailedError",
    "InvalidArgumentError",
    "LLMClient",
    "ModelUnavailableError",
    "NotFoundError",
    "PartialCall",
    "QuotaExceededError",
    "RequestCancelledError",
    "RunEvent",
    "RunResult",
    "ServiceError",
    "Session",
    "StepNote",
    "TextDelta",
    "ToolDefinitionError",
    "ToolError",
    "ToolProvider",
    "ToolResult",
    "Tools",
    "tool_entry",
]
