"""A streaming request: /org/llmos/LLM1/request/<sender>/<handle_token>, org.llmos.Request1.

Modelled on xdg-desktop-portal's Request: the caller picks `handle_token`, so it knows the object path
and can subscribe to its signals before the call returns and before the first chunk flows. Chunks and the
final Response are UNICAST signals addressed to the owner only (a broadcast would be readable by any
client with a match rule); the object disappears after Response.
"""

import asyncio
import contextlib
import logging
from typing import Any

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from llmos.engine.sequence import Usage
from llmos.log_limit import LimitedLog
from system_services.dbus_errors import to_dbus_error
from system_services.engine_worker import CancelledByDaemon, EngineWorker, Job, JobResult
from system_services.ownership import Ownership

IFACE = "org.llmos.Request1"
VERSION = 1
RESPONSE_OK, RESPONSE_CANCELLED, RESPONSE_FAILED = 0, 1, 2
log = logging.getLogger("llmosd")
_limited = LimitedLog(log)  # a send can fail for every chunk of every stream


def request_path(sender: str, token: str) -> str:
    return f"/org/llmos/LLM1/request/{sender.lstrip(':').replace('.', '_')}/{token}"


def stats(result: JobResult) -> dict[str, Variant]:
    usage: Usage = result.usage
    return {
        "finish_reason": Variant("s", result.finish_reason.value),
        "tokens_in": Variant("u", usage.prompt_tokens),
        "tokens_out": Variant("u", usage.completion_tokens),
        "tokens_cached": Variant("u", result.reused_tokens),  # prompt tokens not recomputed
        "kv_source": Variant("s", result.restored_from or "none"),  # memory, disk, prefix, recomputed
        "priority": Variant("s", result.priority),  # the class it ran at (asked for, capped by policy)
        "ttft_ms": Variant("d", usage.ttft_s * 1000.0),
        "tokens_per_s": Variant("d", usage.decode_tok_s),
        "draft_tokens": Variant("u", usage.draft_tokens),  # speculative decoding: drafted and verified
        "accepted_tokens": Variant("u", usage.accepted_tokens),  # of those, kept
        "forced_tokens": Variant("u", usage.forced_tokens),  # appended without sampling (grammar)
    }


class RequestObject(ServiceInterface):
    def __init__(
        self,
        bus: Any,
        worker: EngineWorker,
        ownership: Ownership,
        owner: str,
        path: str,
        job: Job,
        on_result: Any = None,
    ) -> None:
        super().__init__(IFACE)
        self.bus, self.worker, self.ownership = bus, worker, ownership
        self.owner, self.path, self.job = owner, path, job
        self._on_result = on_result  # called with the JobResult when the request succeeds
        self._chunks = 0
        self._closed = False

    def start(self) -> None:
        self.bus.export(self.path, self)
        self.ownership.add(self)
        self.job.on_delta = self._send_chunk
        asyncio.get_running_loop().create_task(self._wait(self.worker.submit(self.job)))

    # -- D-Bus -------------------------------------------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "u":
        Ownership.check(self)  # even reading a request's properties is for its owner only
        return VERSION

    @method()
    def Cancel(self) -> None:
        """Stop generating; a Response with code 1 (cancelled) follows."""
        Ownership.check(self)
        self.worker.cancel(self.job, "cancelled by its owner")

    # Declared for introspection only: they are sent as unicast messages by _unicast, never broadcast.
    @signal()
    def Chunk(self) -> "s":
        return ""

    @signal()
    def Response(self) -> "ua{sv}":
        return [0, {}]

    # -- internals ---------------------------------------------------------------------------------
    def _unicast(self, member: str, signature: str, body: list[Any]) -> None:
        send_unicast(self.bus, self.owner, self.path, IFACE, member, signature, body)

    def _send_chunk(self, text: str) -> None:
        if not self._closed:
            self._chunks += 1
            self._unicast("Chunk", "s", [text])

    async def _wait(self, fut: asyncio.Future[JobResult]) -> None:
        try:
            result = await fut
        except CancelledByDaemon as e:
            self._respond(
                RESPONSE_CANCELLED,
                {
                    "error_name": Variant("s", "org.llmos.Error.Cancelled"),
                    "error_message": Variant("s", str(e)),
                },
            )
        except Exception as e:
            err: DBusError = to_dbus_error(e)
            self._respond(
                RESPONSE_FAILED,
                {"error_name": Variant("s", err.type), "error_message": Variant("s", err.text)},
            )
        else:
            if self._on_result is not None:
                self._on_result(result)
            body = {
                "text": Variant("s", result.text),
                "chunks": Variant("u", self._chunks),
                **stats(result),
            }
            self._respond(RESPONSE_OK, body)

    def _respond(self, code: int, results: dict[str, Variant]) -> None:
        try:
            if not self._closed:
                self._unicast("Response", "ua{sv}", [code, results])
        finally:
            self._teardown()

    def close(self, why: str, owner_gone: bool = True) -> None:
        """Stop the work. A caller still on the bus (its session was closed) gets Response code 1;
        one that left gets nothing more."""
        if self._closed:
            return
        if not owner_gone:
            self._unicast(
                "Response",
                "ua{sv}",
                [
                    RESPONSE_CANCELLED,
                    {
                        "error_name": Variant("s", "org.llmos.Error.Cancelled"),
                        "error_message": Variant("s", why),
                    },
                ],
            )
        self._closed = True
        self.worker.cancel(self.job, why)
        self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        self.ownership.remove(self)
        with contextlib.suppress(Exception):  # already gone
            self.bus.unexport(self.path, self)


def send_unicast(
    bus: Any, owner: str, path: str, iface: str, member: str, signature: str, body: list[Any]
) -> None:
    """A signal addressed to `owner` only (a broadcast would reach anyone with a match rule)."""
    msg = Message(
        message_type=MessageType.SIGNAL,
        destination=owner,
        path=path,
        interface=iface,
        member=member,
        signature=signature,
        body=body,
    )
    fut = bus.send(msg)
    if fut is not None:
        fut.add_done_callback(_log_send_failure)


def _log_send_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        _limited.failed("signal sends", fut.exception(), level=logging.WARNING)
