"""A dbus-fast MessageBus that does not tell other connections about each caller's objects.

dbus-fast broadcasts ObjectManager.InterfacesAdded/Removed for every exported object and answers
GetManagedObjects with all of them, and introspection of a parent path lists its children. Here every
session and request belongs to one caller, and its path (the caller's unique name and chosen handle
token) is nobody else's business, so none of that happens: owners learn their object paths from the
method replies that create them.
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Message
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus

# Subtrees whose objects each belong to one caller: never listed by introspection.
PRIVATE_ROOTS = ("/org/llmos/LLM1/session", "/org/llmos/LLM1/request", "/org/llmos/Agent1/task")


def _private(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in PRIVATE_ROOTS)


class PrivateObjectsBus(MessageBus):
    def _emit_interface_added(self, path: str, interface: Any) -> None:
        return None

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        return None

    def _default_get_managed_objects_handler(self, msg: Message, send_reply: Any) -> None:
        send_reply(Message.new_method_return(msg, "a{oa{sa{sv}}}", [{}]))

    def _introspect_export_path(self, path: str) -> intr.Node:
        """Introspection lists public children only: no live session numbers or request paths."""
        node = super()._introspect_export_path(path)
        base = path.rstrip("/")
        node.nodes = [n for n in node.nodes if not _private(f"{base}/{n.name}")]
        return node
