"""Objects owned by D-Bus connections: who may touch what, and cleanup when an owner leaves the bus.

A session or request belongs to the connection (unique name) that created it. Any other connection gets
org.llmos.Error.AccessDenied; when the owner disconnects (NameOwnerChanged with an empty new owner), its
objects are closed, which cancels their work and frees their KV memory.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Protocol

from system_services.caller import current_sender
from system_services.dbus_errors import error

log = logging.getLogger("llmosd")


class Owned(Protocol):
    owner: str
    path: str

    def close(self, why: str, owner_gone: bool = True) -> None: ...


class Ownership:
    def __init__(self) -> None:
        self._by_owner: dict[str, dict[str, Owned]] = defaultdict(dict)

    def add(self, obj: Owned) -> None:
        self._by_owner[obj.owner][obj.path] = obj

    def remove(self, obj: Owned) -> None:
        objs = self._by_owner.get(obj.owner)
        if objs is not None:
            objs.pop(obj.path, None)
            if not objs:
                del self._by_owner[obj.owner]

    def count(self, owner: str, kind: type | None = None) -> int:
        objs = self._by_owner.get(owner, {}).values()
        return sum(1 for o in objs if kind is None or isinstance(o, kind))

    def owned_by(self, owner: str) -> list[Owned]:
        return list(self._by_owner.get(owner, {}).values())

    def all(self) -> list[Owned]:
        return [o for objs in self._by_owner.values() for o in objs.values()]

    @staticmethod
    def check(obj: Owned) -> str:
        """The current caller, if it owns `obj`; AccessDenied otherwise."""
        sender = current_sender()
        if sender != obj.owner:
            raise error("AccessDenied", f"{obj.path} belongs to another connection")
        return sender

    def owner_left(self, name: str) -> None:
        objs = self.owned_by(name)
        if objs:
            log.info("%s left the bus: closing %d object(s)", name, len(objs))
        for obj in objs:
            obj.close(f"{name} left the bus", owner_gone=True)
