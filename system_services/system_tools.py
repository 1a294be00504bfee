"""The tools llmosd itself provides to agent runs: the time, the battery, a desktop notification.

They sit beside the tools apps register (agents/tools.py) and are offered the same way, but their
"provider" is the machine: UPower on the system bus, the notification server on the user's session bus.
A service that is not there is reported as such (availability gives the reason, a call returns
{"error": ...}); nothing is ever made up in its place, because a model told "80 %" by a fallback would
pass it on to the user as fact. Every call out is bounded (dbus-fast has no call timeout), and every
failure comes back as a value the model reads, never as an exception that would end the run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agents.tools import Tool, ToolSpec, argument_problems
from system_services.bus_driver import driver_call

SYSTEM_OWNER = "llmosd"
SYSTEM_APP_ID = "llmos"
SYSTEM_TOOL_NAMES = ("current_time", "battery_status", "send_notification")
CALL_TIMEOUT_S = 5.0

PROPERTIES = "org.freedesktop.DBus.Properties"
UPOWER = "org.freedesktop.UPower"
UPOWER_PATH = "/org/freedesktop/UPower"
UPOWER_DISPLAY = "/org/freedesktop/UPower/devices/DisplayDevice"
UPOWER_DEVICE = "org.freedesktop.UPower.Device"
NOTIFICATIONS = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"

UPOWER_WHAT = "UPower (org.freedesktop.UPower)"
NOTIFICATIONS_WHAT = "the notification service (org.freedesktop.Notifications)"
NO_USER_SESSION = "llmosd runs on the system bus and cannot reach a user's desktop notifications"
# UPower's Device.State (u), as its documentation names them.
BATTERY_STATES = {
    0: "unknown",
    1: "charging",
    2: "discharging",
    3: "empty",
    4: "fully-charged",
    5: "pending-charge",
    6: "pending-discharge",
}
# Replies that mean "nobody serves this name" rather than "the service failed".
_ABSENT_ERRORS = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")

_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
SPECS = (
    ToolSpec(
        name="current_time",
        description="The current local date, time, weekday and time zone of this computer.",
        parameters=_NO_ARGUMENTS,
        shared=True,
    ),
    ToolSpec(
        name="battery_status",
        description=(
            "This computer's battery: whether it runs on battery, the charge in percent, whether it is "
            "charging or discharging, and the time to empty or to full in seconds when known."
        ),
        parameters=_NO_ARGUMENTS,
        shared=True,
    ),
    ToolSpec(
        name="send_notification",
        description="Show a desktop notification to the user: a short summary line and an optional body.",
        parameters={
            "type": "object",
            "properties": {
                "summary": {"type": "string", "minLength": 1, "maxLength": 200},
                "body": {"type": "string", "minLength": 0, "maxLength": 1000},
            },
            "required": ["summary"],
            "additionalProperties": False,
        },
        shared=True,
    ),
)


class _CallFailed(Exception):
    """A call out that did not give a usable answer; its text is what the model (or user) reads."""


class SystemTools:
    """The built-in tools, bound to the daemon's bus (and, from the session bus, a lazy system bus)."""

    def __init__(
        self, bus: MessageBus, *, on_system_bus: bool, call_timeout_s: float = CALL_TIMEOUT_S
    ) -> None:
        self.bus, self.on_system_bus, self.call_timeout_s = bus, on_system_bus, call_timeout_s
        self._specs = {s.name: s for s in SPECS}
        self._system: MessageBus | None = None  # the lazily made system-bus connection (session daemon)
        self._system_lock = asyncio.Lock()  # one connection attempt at a time
        self._checks: dict[str, Callable[[], Awaitable[str | None]]] = {
            "current_time": self._time_available,
            "battery_status": self._battery_available,
            "send_notification": self._notifications_available,
        }
        self._runs: dict[str, Callable[[dict[str, Any], str], Awaitable[Any]]] = {
            "current_time": self._current_time,
            "battery_status": self._battery_status,
            "send_notification": self._send_notification,
        }

    # -- the interface the daemon uses -------------------------------------------------------------
    def specs(self) -> list[ToolSpec]:
        return list(SPECS)

    async def availability(self, names: Iterable[str]) -> dict[str, str | None]:
        """name -> None if the tool works now, else why not (checked live: services come and go)."""
        wanted = list(dict.fromkeys(names))

        async def one(name: str) -> str | None:
            check = self._checks.get(name)
            return f"{name} is not a system tool" if check is None else await check()

        reasons = await asyncio.gather(*(one(n) for n in wanted))
        return dict(zip(wanted, reasons, strict=True))

    async def usable(self, names: Iterable[str]) -> list[Tool]:
        reasons = await self.availability(names)
        return [
            Tool(self._specs[name], SYSTEM_OWNER, SYSTEM_APP_ID, "")
            for name, why in reasons.items()
            if why is None
        ]

    async def call(self, name: str, arguments: dict[str, Any], *, app_id: str) -> Any:
        """The tool's JSON result, or {"error": ...}; never raises for anything the call meets."""
        spec, run = self._specs.get(name), self._runs.get(name)
        if spec is None or run is None:
            return {"error": f"there is no system tool named {name!r}"}
        if problem := check_arguments(spec.parameters, arguments):
            return {"error": f"invalid arguments for {name}: {problem}"}
        try:
            return await run(arguments, app_id)
        except _CallFailed as e:
            return {"error": str(e)}

    async def close(self) -> None:
        system, self._system = self._system, None
        if system is not None:
            system.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(system.wait_for_disconnect(), self.call_timeout_s)

    # -- availability ------------------------------------------------------------------------------
    async def _time_available(self) -> str | None:
        return None  # the clock is always there

    async def _battery_available(self) -> str | None:
        try:
            bus = await self._system_bus()
            return await self._service_reason(bus, UPOWER, UPOWER_WHAT, "system bus")
        except _CallFailed as e:
            return str(e)

    async def _notifications_available(self) -> str | None:
        if self.on_system_bus:
            return NO_USER_SESSION  # a system service has no user session bus to reach
        try:
            return await self._service_reason(self.bus, NOTIFICATIONS, NOTIFICATIONS_WHAT, "session bus")
        except _CallFailed as e:
            return str(e)

    async def _service_reason(self, bus: MessageBus, name: str, what: str, where: str) -> str | None:
        """None if `name` has an owner, or the bus would start one on the first call (notification
        servers such as dunst or mako are often D-Bus activated, so "not running yet" is not "absent")."""
        try:
            (owned,) = await self._call(bus, driver_call("NameHasOwner", "s", [name]), f"the {where}")
            if owned:
                return None
            (activatable,) = await self._call(bus, driver_call("ListActivatableNames"), f"the {where}")
        except _CallFailed as e:
            raise _CallFailed(f"cannot tell whether {what} runs: {e}") from None
        if name in activatable:
            return None
        return f"{what} is not running on the {where}"

    # -- the tools ---------------------------------------------------------------------------------
    async def _current_time(self, arguments: dict[str, Any], app_id: str) -> dict[str, Any]:
        now = datetime.now().astimezone()  # local time as the C library sees it: honours TZ
        offset = now.utcoffset()
        minutes = int(offset.total_seconds() // 60) if offset is not None else 0
        sign = "-" if minutes < 0 else "+"
        return {
            "iso": now.isoformat(timespec="seconds"),
            "date": now.strftime("%Y-%m-%d"),
            "time": now.strftime("%H:%M"),
            "weekday": now.strftime("%A"),
            "timezone": now.tzname() or "",
            "utc_offset": f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}",
            "unix": int(now.timestamp()),
        }

    async def _battery_status(self, arguments: dict[str, Any], app_id: str) -> dict[str, Any]:
        bus = await self._system_bus()
        on_battery_call = _properties_call(UPOWER_PATH, "Get", "ss", [UPOWER, "OnBattery"])
        device_call = _properties_call(UPOWER_DISPLAY, "GetAll", "s", [UPOWER_DEVICE])
        (on_battery,), (device,) = await asyncio.gather(
            self._call(bus, on_battery_call, UPOWER_WHAT, "system bus"),
            self._call(bus, device_call, UPOWER_WHAT, "system bus"),
        )
        try:
            on = bool(_plain(on_battery))
            props = {k: _plain(v) for k, v in device.items()}
            if not props.get("IsPresent", False):
                return {"battery_present": False, "on_battery": on}
            out: dict[str, Any] = {
                "on_battery": on,
                "battery_present": True,
                "percentage": float(props["Percentage"]),
                "state": BATTERY_STATES.get(int(props["State"]), "unknown"),
            }
            # UPower says 0 for "not known"; leaving the key out keeps the model from reading "0 s left".
            if int(props.get("TimeToEmpty", 0)) > 0:
                out["time_to_empty_s"] = int(props["TimeToEmpty"])
            if int(props.get("TimeToFull", 0)) > 0:
                out["time_to_full_s"] = int(props["TimeToFull"])
            return out
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _CallFailed(f"{UPOWER_WHAT} answered with unexpected battery properties ({e})") from None

    async def _send_notification(self, arguments: dict[str, Any], app_id: str) -> dict[str, Any]:
        if self.on_system_bus:
            raise _CallFailed(NO_USER_SESSION)
        msg = Message(
            destination=NOTIFICATIONS,
            path=NOTIFICATIONS_PATH,
            interface=NOTIFICATIONS,
            member="Notify",
            signature="susssasa{sv}i",
            body=[app_id, 0, "", arguments["summary"], arguments.get("body", ""), [], {}, -1],
        )
        (notification_id,) = await self._call(self.bus, msg, NOTIFICATIONS_WHAT, "session bus")
        return {"sent": True, "id": int(notification_id)}

    # -- plumbing ----------------------------------------------------------------------------------
    async def _system_bus(self) -> MessageBus:
        """The daemon's own bus when it serves on the system bus; otherwise a connection of our own,
        made on first use (and again if it dropped: the system bus may have restarted)."""
        if self.on_system_bus:
            return self.bus
        async with self._system_lock:
            if self._system is not None and self._system.connected:
                return self._system
            self._system = None
            bus: MessageBus | None = None
            try:
                bus = MessageBus(bus_type=BusType.SYSTEM)  # honours DBUS_SYSTEM_BUS_ADDRESS
                await asyncio.wait_for(bus.connect(), self.call_timeout_s)
            except Exception as e:
                if bus is not None:
                    with contextlib.suppress(Exception):
                        bus.disconnect()
                why = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
                raise _CallFailed(f"no system bus (cannot connect: {why})") from None
            self._system = bus
            return bus

    async def _call(self, bus: MessageBus, msg: Message, what: str, where: str = "") -> list[Any]:
        """The reply's body, or _CallFailed saying what went wrong in words."""
        try:
            reply = await asyncio.wait_for(bus.call(msg), self.call_timeout_s)
        except TimeoutError:
            raise _CallFailed(f"{what} did not answer within {self.call_timeout_s:g} s") from None
        except Exception as e:  # the connection broke, or the message could not be sent
            raise _CallFailed(f"{what} could not be reached: {str(e) or type(e).__name__}") from None
        if reply is None:
            raise _CallFailed(f"{what} could not be reached: no reply")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            if reply.error_name in _ABSENT_ERRORS and where:
                raise _CallFailed(f"{what} is not running on the {where}")
            if reply.error_name == "org.freedesktop.DBus.Error.NoReply":
                raise _CallFailed(f"{what} gave no answer ({text})" if text else f"{what} gave no answer")
            raise _CallFailed(f"{what} answered with an error: {reply.error_name}: {text}".rstrip(": "))
        return reply.body


def check_arguments(schema: dict[str, Any], value: Any) -> str | None:
    """What is wrong with `value` for a system tool's parameters, or None: the checks every tool call gets
    (agents.tools.argument_problems; the system tools' schemas are flat), and strings D-Bus can carry,
    because these go onto the wire as they are."""
    if problems := argument_problems(schema, value):
        return "; ".join(problems)
    for key, item in value.items():
        if isinstance(item, str):
            if "\0" in item:
                return f"{key!r} must not contain NUL characters"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return f"{key!r} must not contain unpaired surrogates"
    return None


def _properties_call(path: str, member: str, signature: str, body: list[Any]) -> Message:
    return Message(
        destination=UPOWER, path=path, interface=PROPERTIES, member=member, signature=signature, body=body
    )


def _plain(v: Any) -> Any:
    return v.value if isinstance(v, Variant) else v
