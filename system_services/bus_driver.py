"""Calls to the bus itself (org.freedesktop.DBus: NameHasOwner, AddMatch, GetConnectionCredentials…)."""

from typing import Any

from dbus_fast import Message, MessageType

DRIVER = "org.freedesktop.DBus"
DRIVER_PATH = "/org/freedesktop/DBus"


def driver_call(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    """A method call to the bus driver."""
    return Message(
        destination=DRIVER,
        path=DRIVER_PATH,
        interface=DRIVER,
        member=member,
        signature=signature,
        body=body or [],
    )


async def name_has_owner(bus: Any, name: str) -> bool:
    """Whether `name` (a unique or well-known name) is connected now."""
    reply = await bus.call(driver_call("NameHasOwner", "s", [name]))
    return reply.message_type == MessageType.METHOD_RETURN and bool(reply.body and reply.body[0])
