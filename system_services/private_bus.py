"""llmosd's dbus-fast MessageBus: what it answers differently from dbus-fast's defaults.

Nobody's objects are announced to anybody else. dbus-fast broadcasts ObjectManager.InterfacesAdded/
Removed for every exported object and answers GetManagedObjects with all of them, and introspection of
a parent path lists its children. Here every session and request belongs to one caller, and its path
(the caller's unique name and chosen handle token) is nobody else's business, so none of that happens:
owners learn their object paths from the method replies that create them.

And Peer.GetMachineId is answered from the machine id file, as libdbus does. dbus-fast instead forwards
the call to the bus driver, which the stock system bus policy does not let anyone call on that
interface: every caller got AccessDenied, with a message describing llmosd's own connection (uid, pid,
command line).
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Message
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.constants import ErrorType

# Subtrees whose objects each belong to one caller: never listed by introspection.
PRIVATE_ROOTS = ("/org/llmos/LLM1/session", "/org/llmos/LLM1/request", "/org/llmos/Agent1/task")
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def read_machine_id(files: tuple[str, ...] = MACHINE_ID_FILES) -> str | None:
    """The machine id (32 lower-case hex digits) from the first file that holds one; None if none does."""
    for name in files:
        try:
            with open(name, encoding="ascii") as f:
                text = f.read(64).strip()
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            return text
    return None


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

    def _default_get_machine_id_handler(self, msg: Message, send_reply: Any) -> None:
        """Peer.GetMachineId, on any path, without asking the bus (see the module's docstring)."""
        if not self._machine_id:
            self._machine_id = read_machine_id()
        if self._machine_id:
            send_reply(Message.new_method_return(msg, "s", [self._machine_id]))
        else:
            send_reply(Message.new_error(msg, ErrorType.FAILED, "this machine has no machine id"))
