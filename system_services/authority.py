"""Who may use the admin methods (model import, configuration reload): root, or whoever polkit allows.

Root and the daemon's own user pass at once (the latter covers a development daemon on a session bus).
Everyone else is checked with polkit's CheckAuthorization for the caller's bus name, with interaction
allowed so a desktop can ask for the administrator password; the actions are in
packaging/polkit/org.llmos.policy. When polkit cannot be asked (no system bus, no polkitd), the answer
is no: AccessDenied with a message that says why.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from llmos.log_limit import LimitedLog
from system_services.caller import Caller
from system_services.dbus_errors import error

ACTION_MODEL_IMPORT = "org.llmos.model-import"
ACTION_CONFIG_RELOAD = "org.llmos.config-reload"
ALLOW_USER_INTERACTION = 1
log = logging.getLogger("llmosd")
_limited = LimitedLog(log)  # asked once per admin call, which any caller may send in a loop


async def authorize(caller: Caller, action: str, *, daemon_bus_is_system: bool, bus: Any) -> None:
    """Return if `caller` may do `action`; raise org.llmos.Error.AccessDenied otherwise."""
    if caller.uid is not None and caller.uid in (0, os.getuid()):
        return
    try:
        allowed = await _ask_polkit(caller, action, bus if daemon_bus_is_system else None)
    except Exception as e:
        _limited.failed("polkit checks", f"{action} for uid {caller.uid}: {e}", level=logging.WARNING)
        raise error(
            "AccessDenied", f"{action} needs root or polkit authorization, and polkit is unavailable ({e})"
        ) from None
    _limited.recovered("polkit checks")
    if not allowed:
        raise error("AccessDenied", f"not authorized for {action} (polkit said no)")


async def _ask_polkit(caller: Caller, action: str, system_bus: Any) -> bool:
    own = system_bus is None
    bus = system_bus or await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        # A bus-name subject only means something on the bus polkit listens on; elsewhere use the process.
        if own:
            if caller.pid is None or caller.uid is None:
                raise RuntimeError("the caller's pid and uid are unknown")
            subject = (
                "unix-process",
                {
                    "pid": Variant("u", caller.pid),
                    "start-time": Variant("t", 0),
                    "uid": Variant("i", caller.uid),
                },
            )
        else:
            subject = ("system-bus-name", {"name": Variant("s", caller.unique_name)})
        reply = await bus.call(
            Message(
                destination="org.freedesktop.PolicyKit1",
                path="/org/freedesktop/PolicyKit1/Authority",
                interface="org.freedesktop.PolicyKit1.Authority",
                member="CheckAuthorization",
                signature="(sa{sv})sa{ss}us",
                body=[subject, action, {}, ALLOW_USER_INTERACTION, ""],
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        is_authorized, _is_challenge, _details = reply.body[0]
        return bool(is_authorized)
    finally:
        if own:
            bus.disconnect()
